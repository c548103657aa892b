"""The `carve` command: one table of commands, each defined in its own module of carve.cli."""

from __future__ import annotations

import typer

from carve.cli import adapters, demo, evaluate, generate, serve, specialize, submit

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Carve self-specialized experts out of one base model and serve them.")

COMMANDS = {
    "models": (generate.models_command, {}),
    "generate": (generate.generate_command, {}),
    "specialize": (specialize.specialize, {}),
    "eval": (evaluate.eval_command, evaluate.CONTEXT_SETTINGS),
    "serve": (serve.serve_command, {}),
    "submit": (submit.submit, {}),
    "demo": (demo.demo_command, {}),
}
for name, (command, context_settings) in COMMANDS.items():
    app.command(name, context_settings=context_settings or None)(command)
app.add_typer(adapters.app, name="adapters")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
