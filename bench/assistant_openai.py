"""Custom assistants as a newcomer uses them: one command makes an assistant of a knowledge pack's files, and the
official `openai` client asks it the pack's questions by name, against the same model asked without the files.

For each of the world's three knowledge packs (runs/cpu/world/packs/<pack>/), `llmlab assistant create <pack>
--files <the pack's files>` runs as a command (into a fresh store under --out); then `llmlab serve`'s app over
--checkpoint serves in this process (uvicorn on a free loopback port), and every question of the pack (in other
words than the files': `question` in questions.jsonl) goes to `model=<pack>` and to the model itself. An answer
is right when it contains the exact answer. The same figures are computed without HTTP by
llmlab.assistants.evals.pack_accuracy (the reader over the same BM25 passages): the two should agree.

    python bench/assistant_openai.py                        # runs/cpu/sft, runs/cpu/world
    python bench/assistant_openai.py --checkpoint runs/cpu/sft --out bench/out/assistant-openai
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_eval_world import serving  # noqa: E402 (the in-process server of the lm-eval benchmark)

PACK_FILES = {"handbook": ["handbook.md", "policies.txt", "staff.jsonl"],
              "timetable": ["timetable.pdf", "timetable.md", "ferry.txt"],
              "course": ["syllabus.md", "reading.txt", "weeks.jsonl"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/cpu/sft")
    ap.add_argument("--world", default="runs/cpu/world")
    ap.add_argument("--out", default="bench/out/assistant-openai")
    args = ap.parse_args()
    import openai

    from llmlab import checkpoint
    from llmlab import world as worlds
    from llmlab.assistants.evals import pack_accuracy
    from llmlab.engine import Engine
    from llmlab.server.app import ServerConfig, create_app

    out, packs = Path(args.out), Path(args.world) / "packs"
    if not packs.is_dir():
        sys.exit(f"no knowledge packs in {packs}: run `llmlab world --preset cpu` first")
    shutil.rmtree(out / "assistants", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    for pack, files in PACK_FILES.items():
        cmd = [sys.executable, "-m", "llmlab", "assistant", "create", pack, "--store", str(out / "assistants"),
               "--instructions", f"You answer questions about the {pack}.",
               "--files", ",".join(str(packs / pack / f) for f in files)]
        print("$", " ".join(cmd[2:]))
        subprocess.run(cmd, check=True)

    app = create_app(ServerConfig(checkpoint=args.checkpoint, db=str(out / "feedback.db"), world=args.world,
                                  assistants=str(out / "assistants"), model_name="model"))
    results = {}
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        print("models:", [m.id for m in client.models.list().data])
        for pack in PACK_FILES:
            rows = [json.loads(line) for line in (packs / pack / "questions.jsonl").read_text().splitlines()]
            right = without = cited = 0
            for row in rows:
                reply = client.chat.completions.create(model=pack, messages=[{"role": "user", "content": row["question"]}],
                                                       temperature=0, max_tokens=32)
                plain = client.chat.completions.create(model="model", temperature=0, max_tokens=32,
                                                       messages=[{"role": "user", "content": row["question"]}])
                right += row["answer"] in (reply.choices[0].message.content or "")
                without += row["answer"] in (plain.choices[0].message.content or "")
                cited += "citations" in reply.model_dump()
            results[pack] = {"n": len(rows), "with_files": right / len(rows), "without_files": without / len(rows),
                             "cited": cited / len(rows)}
            print(f"{pack:10} {len(rows):3} questions: with files {right / len(rows):.1%}, "
                  f"without {without / len(rows):.1%} (answers read from a passage: {cited / len(rows):.0%})")
    n = sum(r["n"] for r in results.values())
    api = {k: sum(r[k] * r["n"] for r in results.values()) / n for k in ("with_files", "without_files")}
    ckpt = checkpoint.load(args.checkpoint)
    direct = pack_accuracy(Engine(ckpt.model), ckpt.tokenizer, worlds.load(args.world))
    print(f"all {n}: with files {api['with_files']:.1%}, without {api['without_files']:.1%} through the API; "
          f"directly {direct['with_files']:.1%} and {direct['without_files']:.1%}")
    (out / "results.json").write_text(json.dumps({"packs": results, "api": api, "direct": {
        k: direct[k] for k in ("with_files", "without_files", "recall", "faithfulness")}}, indent=1))


if __name__ == "__main__":
    main()
