"""The optional LLM judge (``--judge-url``) against a local stub of an OpenAI-compatible endpoint."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from qdpo.eval import judge as J


class _Stub(BaseHTTPRequestHandler):
    """Rates an answer by its length (min(10, words)); replies without a rating to answers holding 'mute';
    401 without the expected key when the server was given one. Faults by the answer's first word (or the
    class's ``fault`` for every request): '~cut' closes the connection mid-reply, '~garble' sends no HTTP status
    line, '~parts' rates in OpenAI content parts, '~object' sends a content that is neither text nor parts;
    '~busy' answers 429 (Retry-After: 0) to its first two requests, '~down' always 503, '~bad' always 400."""

    key = None
    fault = None
    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, body, self.headers.get("Authorization")))
        if self.key and self.headers.get("Authorization") != f"Bearer {self.key}":
            self.send_response(401, "Unauthorized")
            self.end_headers()
            return
        user = body["messages"][-1]["content"]
        answer = user.split("[Assistant answer]\n")[-1].split("\n\nRate")[0] if "[Assistant answer]" in user else ""
        fault = type(self).fault or (answer.split() or [""])[0]
        tries = sum(b["messages"][-1]["content"] == user for _, b, _ in type(self).seen)
        status = {"~busy": 429 if tries <= 2 else None, "~down": 503, "~bad": 400}.get(fault)
        if status or body["model"] == "no-such-model":
            err = b'{"error": {"message": "The model `no-such-model` does not exist.", "code": 404}}'
            err = b"" if status else err
            self.send_response(status or 404)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", str(len(err)))
            self.end_headers()
            self.wfile.write(err)
            return
        if fault == "~cut":
            self.send_response(200)
            self.send_header("Content-Length", "500")
            self.end_headers()
            self.wfile.write(b'{"choices": [')
            return
        if fault == "~garble":
            self.wfile.write(b"garbage\r\n\r\n")
            return
        if "[Assistant answer]" not in user:
            text = "[[10]]"
        elif "mute" in answer:
            text = "I cannot rate this."
        else:
            text = f"Fine. [[{min(10, max(1, len(answer.split())))}]]"
        content = {"~parts": [{"type": "text", "text": text[:6]}, {"type": "text", "text": text[6:]}],
                   "~object": {"text": text}}.get(fault, text)
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Stub.key, _Stub.fault, _Stub.seen = None, None, []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_scores_are_mean_ratings_and_unrated_answers_are_counted(server):
    questions = ["q1", "q2", "q3"]
    answers = {"a": ["one two three", "one", "one two three four five"], "b": ["mute", "x y", "mute too"]}
    got = J.judge_answers(server, "judge-model", "QDPO_TEST_NO_KEY", questions, answers, disable=True)
    assert got["a"] == {"judge_score": pytest.approx(3.0), "judged": 3, "unrated": 0}
    assert got["b"] == {"judge_score": pytest.approx(2.0), "judged": 1, "unrated": 2}
    path, body, _ = _Stub.seen[0]
    assert path == "/v1/chat/completions" and body["model"] == "judge-model" and body["temperature"] == 0


def test_cut_or_garbled_replies_are_counted_unrated_and_content_parts_are_read(server, monkeypatch):
    monkeypatch.setattr(J, "BACKOFF_S", 0.0, raising=False)  # a cut reply is tried again
    answers = {"a": ["~cut one two", "~garble one", "~parts one two three", "~object one", "one two"]}
    got = J.judge_answers(server, "judge-model", "QDPO_TEST_NO_KEY", list("qqqqq"), answers, disable=True)
    assert got["a"] == {"judge_score": pytest.approx(3.0), "judged": 2, "unrated": 3}  # [[4]] in parts, [[2]]
    for fault in ("~cut", "~garble"):
        _Stub.fault = fault
        with pytest.raises(J.JudgeError, match="cannot reach an OpenAI-compatible"):
            J.check(server, "m", "QDPO_TEST_NO_KEY")


def test_rate_limits_and_busy_servers_are_tried_again_then_counted_unrated(server, monkeypatch):
    monkeypatch.setattr(J, "BACKOFF_S", 0.0, raising=False)
    answers = {"a": ["~busy one two three", "~down one", "~bad one", "one two"]}
    got = J.judge_answers(server, "judge-model", "QDPO_TEST_NO_KEY", ["q1", "q2", "q3", "q4"], answers, disable=True)
    assert got["a"] == {"judge_score": pytest.approx(3.0), "judged": 2, "unrated": 2}  # [[4]] on the 3rd try, [[2]]
    tries = [sum(f"]\n{a}\n\n" in b["messages"][-1]["content"] for _, b, _ in _Stub.seen) for a in answers["a"]]
    assert tries == [3, J.RETRIES, 1, 1]  # 503 up to RETRIES tries; 400 is not tried again
    waits = []
    monkeypatch.setattr(J.time, "sleep", waits.append)
    assert J.rate("http://127.0.0.1:9/v1", "m", None, "q", "a") is None and waits == []  # refused: down, no waiting


def test_rating_parser():
    assert J.RATING.search("ok [[ 7 ]] thanks").group(1) == "7"
    assert J.RATING.search("no rating here") is None
    # the reason quoting the answer's own "[[3]]" came first, and that was taken as the rating
    assert J.rating("The answer's table ends in [[3]], which is wrong. [[8]]") == 8.0
    assert J.rating("no rating here") is None and J.rating("[[11]]") is None and J.rating("[[ 7.5 ]]") == 7.5
    assert J.endpoint("http://h/v1/") == "http://h/v1/chat/completions"
    assert J.endpoint("http://h/v1/chat/completions") == "http://h/v1/chat/completions"
    assert J.endpoint("https://h/d/v1/?api-version=2024-06") == "https://h/d/v1/chat/completions?api-version=2024-06"


def test_urls_are_shown_without_their_secrets():
    """What run.json, metrics.json and the errors show of --judge-url: no password, no secret-named parameter."""
    assert J.shown("") == "" and J.shown("http://host:8000/v1") == "http://host:8000/v1"
    assert J.shown("https://me:pw@h.ai/v1?api-version=2024&api-key=s3&access_token=t&sig=x") == \
        "https://me:***@h.ai/v1?api-version=2024&api-key=***&access_token=***&sig=***"
    assert J.shown("https://me@h.ai/v1?q") == "https://me@h.ai/v1?q="  # a user name alone is no secret


def test_the_startup_check_waits_out_a_rate_limit(server, monkeypatch):
    monkeypatch.setattr(J, "BACKOFF_S", 0.0, raising=False)
    _Stub.fault = "~busy"  # 429 to the first two requests
    J.check(server, "m", "QDPO_TEST_NO_KEY")
    assert len(_Stub.seen) == 3
    _Stub.fault = "~down"
    with pytest.raises(J.JudgeError, match=r"HTTP 503") as e:
        J.check(server + "?key=s3cret", "m", "QDPO_TEST_NO_KEY")
    assert "key=***" in str(e.value) and "s3cret" not in str(e.value)
    assert len(_Stub.seen) == 3 + J.RETRIES and _Stub.seen[-1][0] == "/v1/chat/completions?key=s3cret"


def test_unusable_endpoints_fail_up_front_with_one_clear_message(server, monkeypatch):
    with pytest.raises(J.JudgeError, match="needs --judge-model"):
        J.check(server, "", "QDPO_TEST_NO_KEY")
    with pytest.raises(J.JudgeError, match="cannot reach an OpenAI-compatible"):
        J.check("http://127.0.0.1:9/v1", "m", "QDPO_TEST_NO_KEY", timeout=5)
    _Stub.key = "s3cret"
    monkeypatch.delenv("QDPO_TEST_KEY", raising=False)
    with pytest.raises(J.JudgeError, match="HTTP 401.*set QDPO_TEST_KEY"):
        J.check(server, "m", "QDPO_TEST_KEY")
    monkeypatch.setenv("QDPO_TEST_KEY", "s3cret")
    J.check(server, "m", "QDPO_TEST_KEY")  # the key from the environment is sent
    assert _Stub.seen[-1][2] == "Bearer s3cret"
    with pytest.raises(J.JudgeError, match=r"HTTP 404 \(Not Found: The model `no-such-model` does not exist\.\)$"):
        J.check(server, "no-such-model", "QDPO_TEST_KEY")  # the server's reason, not only its status


def test_the_judge_sees_the_system_prompt_and_every_turn():
    from qdpo.train import judge_question

    assert judge_question([{"role": "user", "content": "Name a prime."}]) == "Name a prime."
    chat = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Name a prime."}]
    assert judge_question(chat) == "System: Answer in French.\nUser: Name a prime."
    chat += [{"role": "assistant", "content": "Sept."}, {"role": "user", "content": "Another?"}]
    assert judge_question(chat).splitlines() == ["System: Answer in French.", "User: Name a prime.",
                                                 "Assistant: Sept.", "User: Another?"]
