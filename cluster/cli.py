"""The `raygpt` command line: one entry point, a subcommand per stage.

    raygpt prepare CONFIG [section.key=value ...]    corpus → tokenizer + shards in RUN_DIR/data
    raygpt run     CONFIG [section.key=value ...]    the main job: every stage in order

Bad configs, paths and inputs exit with status 2 and one line on stderr naming the problem, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from cluster import pipeline
from cluster.config import ConfigError, load_config
from data_pipeline.config import DataError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raygpt", description="Build and train a GPT from scratch on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("prepare", "corpus → tokenizer + webdataset shards in RUN_DIR/data"),
        ("run", "the main job: every stage in order"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("config", help="YAML recipe, e.g. configs/demo.yaml")
        sub.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides of the recipe")
    return parser


def _user_error(error: BaseException) -> BaseException | None:
    """The ConfigError/DataError behind an exception, also when it was raised inside a Ray task or actor."""
    seen = error
    while seen is not None:
        if isinstance(seen, (ConfigError, DataError)):
            return seen
        seen = seen.__cause__ or getattr(seen, "cause", None)
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "prepare":
            pipeline.run_prepare(cfg)
        else:
            pipeline.run(cfg)
    except Exception as e:
        if (user := _user_error(e)) is None:
            raise
        print(f"raygpt: error: {str(user).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
