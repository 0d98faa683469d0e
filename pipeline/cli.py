"""Command-line front end shared by every `python -m stages.NAME` entry point."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from .errors import PipelineError

DEFAULT_CONFIG = "configs/default.toml"


def parser(description: str) -> argparse.ArgumentParser:
    arguments = argparse.ArgumentParser(description=description)
    arguments.add_argument("--config", default=DEFAULT_CONFIG, help="TOML study config (default: %(default)s)")
    arguments.add_argument(
        "--data-dir", default=None, help="folder holding flowers-102/ (read-only; overrides [data] root)"
    )
    arguments.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (overrides [runtime] device)")
    arguments.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set finetune.epochs=5 (repeatable)",
    )
    arguments.add_argument("--force", action="store_true", help="rebuild even when the cache is valid")
    return arguments


def load(arguments: argparse.Namespace):
    """The config from the command line; under torchrun, also join the process group (device per rank)."""
    import dataclasses

    from . import distributed
    from .config import load_config

    config = load_config(
        arguments.config, arguments.overrides, data_dir=arguments.data_dir or None, device=arguments.device or None
    )
    if distributed.launched():
        device = distributed.setup(config.runtime.device)
        config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, device=device))
    return config


def rank_log(line: str) -> None:
    """print on rank 0 only, so N ranks under torchrun do not print every line N times."""
    from . import distributed

    if distributed.is_main():
        print(line, flush=True)


def describe_os_error(error: OSError) -> str:
    """One line for a file-system error: the path, the reason and what to do."""
    import errno

    where = f" {error.filename}" if error.filename else ""
    fixes = {
        errno.ENOSPC: "free space on that disk, or point [cache] root elsewhere",
        errno.EACCES: "fix its permissions (or run as a user who can access it)",
        errno.EPERM: "fix its permissions (or run as a user who can access it)",
        errno.EROFS: "point [cache] root at a writable folder",
        errno.ENOENT: "check that the path exists (a dangling link counts as missing)",
    }
    fix = fixes.get(error.errno, "check the path and rerun")
    return f"cannot access{where}: {error.strerror or error}; {fix}"


def guarded(action: Callable[[], int | None]) -> int:
    """Run `action`, turning expected failures into one-line errors and a non-zero exit code."""
    from . import distributed

    try:
        return action() or 0
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        # The net under every file-system call not translated where it happens: one line, never a traceback.
        print(f"error: {describe_os_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished units stay cached; rerun the same command to continue", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


def run_stage(name: str, argv: list[str] | None = None) -> int:
    """Entry point of `python -m stages.<name>`: build what is invalid in that stage (and its inputs)."""
    from . import graph

    def action():
        stage = graph.get_stage(name)
        arguments = parser(f"{name}: {stage.description}").parse_args(argv)
        study = graph.Graph(load(arguments), log=rank_log)
        study.validate([name])
        study.run(name, force=arguments.force)

    return guarded(action)


def run_all(argv: list[str] | None = None) -> int:
    """Entry point of `make all`: every stage in graph order, each skipping when valid."""
    from . import distributed, graph

    def action():
        arguments = parser("Run every stage of the study, skipping valid ones.").parse_args(argv)
        started = time.perf_counter()
        study = graph.Graph(load(arguments), log=rank_log)
        study.validate(graph.stages())
        for name in graph.stages():
            study.run(name, force=arguments.force)
        rank_log(f"all stages valid ({time.perf_counter() - started:.1f} s)")
        if distributed.is_main():
            from .report_render import summary

            print(summary(study))

    return guarded(action)


def run_invalidate(argv: list[str] | None = None) -> int:
    """Entry point of `make invalidate STAGE=name`."""
    from . import graph

    def action():
        arguments = parser("Drop one stage's outputs so the next run rebuilds it and its dependents.")
        arguments.add_argument("stage", help="stage name")
        parsed = arguments.parse_args(argv)
        study = graph.Graph(load(parsed))
        dropped = study.invalidate(parsed.stage)
        if dropped:
            print(f"[{parsed.stage}] invalidated: {', '.join(dropped)} (dependents rebuild on the next run)")
        else:
            print(f"[{parsed.stage}] nothing cached to invalidate")

    return guarded(action)


def print_settings(argv: list[str] | None = None) -> int:
    """`python -m stages.config [--docs | --backbones]`: print a config, every setting's doc or the backbones."""
    import json

    from .config import describe_settings

    def action():
        arguments = parser("Validate a config and print it resolved; --docs prints every setting.")
        arguments.add_argument("--docs", action="store_true", help="print a Markdown table of every setting")
        arguments.add_argument(
            "--backbones", action="store_true", help="list the backbone names that resolve; * = weights are here"
        )
        parsed = arguments.parse_args(argv)
        if parsed.backbones:
            from .backbones import describe_backbones

            for name, description, local in describe_backbones(load(parsed).weights):
                print(f"{'*' if local else ' '} {name:36} {description}")
            return
        if parsed.docs:
            print("| section | key | default | meaning |\n|---|---|---|---|")
            for section, key, default, doc in describe_settings():
                print(f"| `{section}` | `{key}` | `{json.dumps(default)}` | {doc} |")
            return
        print(json.dumps(load(parsed).to_dict(), indent=2))

    return guarded(action)
