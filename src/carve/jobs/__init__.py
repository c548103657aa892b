"""carve.jobs: specialization jobs submitted by domain teams.

A submission (seeds, domain tag, optional corpus, profile) is validated whole,
stored in ``<registry>/jobs/<id>/`` and recorded in the registry database
(carve.jobs.store); a Ray task runs the self-specialization pipeline and
registers the adapter under the tag (carve.jobs.runner); carve.jobs.service
accepts, follows, cancels and resumes jobs; carve.jobs.api is the HTTP
contract and carve.jobs.http its endpoints as plain functions.
"""
