"""`thinksafe <stage> ...` / `python -m thinksafe <stage> ...`: one subcommand per pipeline stage.

Each stage module owns its argument parser and exposes `main(argv) -> int`; this file only
dispatches, importing the stage lazily so `--help` stays fast and a CPU install never imports vLLM.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys

from thinksafe.console import attach_from_env, say
from thinksafe.errors import ThinksafeError

# stage -> (module, one-line description), in pipeline order.
STAGES: dict[str, tuple[str, str]] = {
    "plan": ("thinksafe.plan", "validate the scripts' arguments; print the run name and every output path"),
    "synthesize": ("thinksafe.synthesize", "self-generate steered responses and keep those the guard judges safe"),
    "train": ("thinksafe.train.sft", "LoRA-SFT on kept rows (prompt masking, forward KL on benign rows)"),
    "merge": ("thinksafe.merge", "merge a LoRA adapter into its base model"),
    "evaluate": ("thinksafe.evaluate.run", "reasoning and safety benchmarks"),
    "report": ("thinksafe.report", "table and plot across runs"),
    "grpo": ("thinksafe.train.grpo", "GRPO baseline with guard and format rewards"),
    "pipeline": ("thinksafe.pipeline", "synthesize -> train -> merge -> evaluate -> report (train_and_eval.sh)"),
    "grid": ("thinksafe.grid", "models x variants x seeds (x a sweep) in one command, one report (grid.sh)"),
    "engine": ("thinksafe.shared_engine", "one generation engine for the pipeline's stages (started by the pipeline)"),
    "demo-model": ("thinksafe.model_loading", "convert the embedded SmolLM2-135M demo model (first use only)"),
}


INTERRUPTED = "interrupted; rerun the same command to resume"
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT
FILESYSTEM_REFUSALS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EEXIST,
                       errno.EISDIR, errno.ENOTDIR}


def usage() -> str:
    width = max(map(len, STAGES))
    lines = ["usage: thinksafe <stage> [options]   (thinksafe <stage> --help for a stage's options)", "", "stages:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"error: unknown stage {stage!r}; choose one of: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=os.environ.get("THINKSAFE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    attach_from_env()  # under the pipeline: this stage's own lines also go to its terminal

    try:
        module = importlib.import_module(STAGES[stage][0])
        return int(module.main(rest) or 0)
    except ThinksafeError as err:
        say(f"error: {err}", error=True)
        return getattr(err, "exit_code", 2)  # a bad input: 2; a failure at run time (a lost replica) says 1
    except KeyboardInterrupt:
        # Every stage writes through resumable logs and atomic renames: the state on disk is valid.
        say(f"\n{INTERRUPTED}", error=True)
        return EXIT_INTERRUPTED
    except OSError as err:
        if err.errno not in FILESYSTEM_REFUSALS:
            if engine_died(err):
                return engine_death(err)
            raise
        # Filesystem refusals a stage did not foresee (a read-only cache, a full disk, a file where a
        # directory belongs): the user's to fix, so one line, not a traceback.
        say(f"error: {describe_os_error(err)}", error=True)
        return 2
    except Exception as err:
        if not engine_died(err):
            raise
        return engine_death(err)


ENGINE_DEATHS = {"EngineDeadError", "EngineGenerateError"}  # vllm.v1.engine.exceptions, by name: no vLLM import


def engine_died(err: BaseException) -> bool:
    return any(type(e).__name__ in ENGINE_DEATHS for e in (err, err.__cause__, err.__context__) if e is not None)


def engine_death(err: BaseException) -> int:
    """The vLLM engine process died (killed, out of memory): one line; what was generated is logged."""

    say("error: the vLLM engine process died; what was generated is kept: rerun the same command to resume",
        error=True)
    return 1


def describe_os_error(err: OSError) -> str:
    where = f": {err.filename}" if err.filename else ""
    return f"{err.strerror or type(err).__name__}{where}"


if __name__ == "__main__":
    sys.exit(main())
