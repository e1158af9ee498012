"""The sandbox escapes again, this time as a user of `llmlab serve` would send them: the model (a scripted one)
calls the python tool with the attacker's code, the engine runs it inside the server, and the host must stay
as it was (tests/test_sandbox_escapes.py's `Host` checks: the secret file, the environment that holds the
server's API key, the server's own process, markers outside, no sandbox folder left)."""

from __future__ import annotations

import os

import openai
import pytest

from llmlab.scheduler import Scheduler
from llmlab.server.app import ServerConfig, create_app
from llmlab.tools.result import ToolResult
from serving import LiveServer, ScriptModel, make_checkpoint, make_tokenizer
from test_sandbox_escapes import HOOK_ESCAPE, SANDBOX_MISSING, Host, host, victim  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(bool(SANDBOX_MISSING), reason=f"the python tool's sandbox cannot run here: "
                                                                 f"{SANDBOX_MISSING}")
CONTEXT = 6144
KEY = "sk-the-servers-own-key"


def python_script(tok):
    """An assistant that runs the user's message as a python program, then says "Done." and stops."""
    sp = tok.special_id
    start, end = sp("<|assistant_start|>"), sp("<|assistant_end|>")

    def script(seq: list[int]) -> int:
        if start not in seq:
            return tok.bos_id
        turn = seq[len(seq) - 1 - seq[::-1].index(start) + 1:]
        if sp("<|output_end|>") in turn:
            plan, written = tok.encode(" Done.") + [end], turn[turn.index(sp("<|output_end|>")) + 1:]
        else:
            code = tok.decode(seq[seq.index(sp("<|user_start|>")) + 1: seq.index(sp("<|user_end|>"))])
            plan, written = [sp("<|tool_start|>")] + tok.encode("python\n" + code) + [sp("<|tool_end|>")], turn
        return plan[len(written)] if len(written) < len(plan) else end

    return script


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("sandbox-api")
    make_tokenizer(root / "tok")
    ckpt = make_checkpoint(root / "tok", root / "ckpt", context_len=CONTEXT)
    app = create_app(ServerConfig(checkpoint=str(ckpt), db=str(root / "feedback.db"), model_name="m",
                                  world=str(root / "no-world"), api_key=KEY, max_tokens=CONTEXT))
    service = app.state.service
    service.scheduler.shutdown()
    service.scheduler = Scheduler(ScriptModel(service.tokenizer.vocab_size, python_script(service.tokenizer),
                                              context_len=CONTEXT), service.tokenizer, max_batch=4)
    live = LiveServer(app)
    yield live
    live.stop()


def _through_the_api(live, host: Host, code: str) -> ToolResult:
    values = {"SECRET_FILE": str(host.secret_file), "HOST_DIR": str(host.folder), "PARENT": os.getpid(),
              "VICTIM": host.victim.pid, "MARKERS": [str(m) for m in host.markers]}
    program = "".join(f"{name} = {value!r}\n" for name, value in values.items()) + code
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": program}],
                                           temperature=0, max_tokens=CONTEXT - 1500)
    message = reply.choices[0].message
    calls = message.model_extra.get("executed_tool_calls")
    assert calls, message
    assert len(calls) == 1 and calls[0]["function"]["name"] == "python", calls
    assert message.content.strip().endswith("Done.")
    output = calls[0]["output"]
    result = ToolResult(output, not output.startswith("error: "))
    host.assert_untouched(result)
    assert KEY not in output  # the server's key, in its environment and memory, is nowhere in reach
    return result


ATTACKS = {
    "audit-hook escape": HOOK_ESCAPE,
    "read a host file": "print(open(SECRET_FILE).read())",
    "read /etc/passwd": "print(open('/etc/passwd').read())",
    "the server's environment": "import os\nprint(dict(os.environ))\nprint(open('/proc/1/environ').read())",
    "kill the server": "import os\nos.kill(PARENT, 9)",
    "pidfd to the server": "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(PARENT), signal.SIGKILL)",
    "renice the server": "import os\nos.setpriority(os.PRIO_PROCESS, PARENT, 19)",
    "write outside": "for m in MARKERS:\n    open(m, 'w').write('escaped')",
    "connect to the server": "import socket\nsocket.create_connection(('127.0.0.1', 8000), timeout=1)",
    "a shell": "import subprocess\nprint(subprocess.run(['sh', '-c', 'cat /etc/passwd'], capture_output=True))",
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_escapes_sent_through_the_api_leave_the_host_untouched(served, host, name):
    result = _through_the_api(served, host, ATTACKS[name])
    if name == "audit-hook escape":
        assert "deny tables cleared: []" in result.text and "os.system returned 0" not in result.text
    elif name == "the server's environment":  # readable, and only the sandbox's own
        assert result.ok and "HOME': '/tmp'" in result.text and "LLMLAB_TEST_SECRET" not in result.text
    else:
        assert not result.ok, result.text  # each one fails inside the sandbox
