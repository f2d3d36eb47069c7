"""`fewchips generate` and `fewchips chat` run end to end on a saved tiny model directory, and the
inference commands keep their documented flags."""

import io
import subprocess
import sys

import pytest

from fewchips.cli import build_parser, main

from inference_utils import save_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("cli") / "m")


@pytest.mark.slow
def test_generate_plain_and_mtp(model_dir, capsys):
    assert main(["generate", "--model", model_dir, "--prompt", "hello world", "--max-new-tokens", "6"]) == 0
    plain = capsys.readouterr()
    assert plain.out.startswith("hello world") and "tok/s" in plain.err
    assert main(["generate", "--model", model_dir, "--prompt", "hello world", "--max-new-tokens", "6", "--mtp"]) == 0
    spec = capsys.readouterr()
    assert spec.out == plain.out                                   # greedy: MTP changes speed, not text
    assert "MTP acceptance" in spec.err and "tokens per forward" in spec.err
    assert main(["generate", "--model", model_dir, "--prompt", "hello world", "--max-new-tokens", "6",
                 "--compile"]) == 0
    assert capsys.readouterr().out == plain.out                    # compiled decode steps: same greedy text
    assert main(["generate", "--model", model_dir, "--prompt", "hi", "--temperature", "0.8", "--seed", "3",
                 "--top-p", "0.9", "--top-k", "50", "--chat"]) == 0


def test_generate_bad_input_is_one_line(model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "error" in capsys.readouterr().err


def test_chat_session(model_dir, monkeypatch):
    args = build_parser().parse_args(["chat", "--model", model_dir, "--max-new-tokens", "5", "--temperature", "0"])
    out = io.StringIO()
    from fewchips.cli import chat
    assert chat.run(args, stdin=io.StringIO("hello\nhow are you\n/reset\nhi\n/exit\n"), stdout=out) == 0
    assert out.getvalue().count("> ") == 5


def test_flags():
    p = build_parser()
    a = p.parse_args(["serve", "--model", "m"])
    assert (a.host, a.port, a.api_key, a.max_batch) == ("127.0.0.1", 8000, None, 16)
    a = p.parse_args(["generate", "--model", "m", "--prompt", "x"])
    assert (a.max_new_tokens, a.temperature, a.mtp) == (64, 0.0, False)
    a = p.parse_args(["chat", "--model", "m"])
    assert a.max_new_tokens == 512


@pytest.mark.multiprocess
@pytest.mark.slow
def test_serve_command_starts_and_answers(model_dir):
    """The real `fewchips serve` process: binds 127.0.0.1, answers, and stops on SIGINT."""
    import socket
    import time

    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fewchips", "serve", "--model", model_dir, "--port", str(port),
                             "--max-len", "128"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, (proc.stdout.read() if proc.poll() is not None
                                                                    else "timeout")
            time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hello", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_tokenizer_config_bos_and_chat_template(model_dir, tmp_path):
    import json
    import shutil

    from fewchips.inference.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(model_dir)
    assert tok.encode("hello")[0] != tok.bos_token_id                 # add_bos_token absent: as tokenized
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=False).endswith("<|assistant|>")
    shutil.copy(f"{model_dir}/tokenizer.json", tmp_path)
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({"bos_token": "<bos>", "eos_token": {"content": "<eos>"}, "add_bos_token": True}, f)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("hello")[0] == tok.bos_token_id and tok.eos_token_id == tok.tok.token_to_id("<eos>")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}])     # no template: a plain transcript


def test_chat_goes_on_after_an_empty_line_and_a_stopped_reply(model_dir):
    """An empty line asks again; Ctrl-C while a reply is written stops that reply (the engine aborts it)
    and the session goes on; /exit quits."""
    args = build_parser().parse_args(["chat", "--model", model_dir, "--max-new-tokens", "20", "--temperature", "0"])

    class CtrlCOnce(io.StringIO):              # the terminal's Ctrl-C, arriving during the first reply
        fired = False

        def write(self, s):
            if not self.fired and s and s != "> " and self.getvalue().endswith("> "):
                CtrlCOnce.fired = True
                raise KeyboardInterrupt
            return super().write(s)

    out = CtrlCOnce()
    from fewchips.cli import chat
    assert chat.run(args, stdin=io.StringIO("hello\n\nhi\n/exit\n"), stdout=out) == 0
    text = out.getvalue()
    assert CtrlCOnce.fired and text.count("[stopped]") == 1 and text.count("> ") == 4
