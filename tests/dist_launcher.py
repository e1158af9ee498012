"""Run `llmlab <stage> ...` under torchrun with a record of what this rank writes (not a test module).

Each rank writes its pid to $LLMLAB_TEST_LOG.pid.<rank> and, through a Python audit hook, one line per file
opened for writing, directory made, or file renamed or removed below $LLMLAB_TEST_WATCH to
$LLMLAB_TEST_LOG.writes.<rank>, so a test can check that only rank 0 writes and can kill a given rank.
"""

import os
import sys

rank = os.environ.get("RANK", "0")
prefix = os.environ["LLMLAB_TEST_LOG"]
watch = os.path.abspath(os.environ["LLMLAB_TEST_WATCH"])
with open(f"{prefix}.pid.{rank}", "w") as f:
    f.write(str(os.getpid()))
log = open(f"{prefix}.writes.{rank}", "w", buffering=1)


def _below(path) -> bool:
    try:
        return os.path.abspath(os.fsdecode(path)).startswith(watch)
    except TypeError:
        return False  # a file descriptor


def hook(event: str, args: tuple) -> None:
    if event == "open" and _below(args[0]):
        mode, flags = args[1], args[2]
        if (mode and any(c in mode for c in "wax+")) or (mode is None and flags & (os.O_WRONLY | os.O_RDWR)):
            log.write(f"open {args[0]}\n")
    elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree") and _below(args[0]):
        log.write(f"{event} {args[0]}\n")


sys.addaudithook(hook)

from llmlab.cli import main  # noqa: E402

main(sys.argv[1:])
