"""Optional LLM-judge scores (``--judge-url``): single-answer grading through an OpenAI-compatible endpoint.

Every model's greedy answer to every test prompt is shown to a judge model
served at ``--judge-url`` (any server speaking the OpenAI chat-completions
protocol: a hosted API, vLLM, llama.cpp's server, ...), which rates it from 1
to 10 and writes the rating as ``[[N]]``. The score of a model is the mean
rating over the answers the judge rated; answers it did not rate (an error, a
reply without ``[[N]]``) are counted, not guessed. A rate limit (HTTP 429), a
busy server (5xx) or a dropped connection is tried again first (``RETRIES``
tries per answer, waiting the server's ``Retry-After`` or a doubling backoff).
The default run never needs a judge: the FP model's own NLL of each answer
(``fp_nll``) is the free judge every run reports.

Requests are plain HTTPS/HTTP POSTs (``urllib``): no client library. The API
key, when the server wants one, is read from the environment variable named by
``--judge-key-env`` (default ``OPENAI_API_KEY``) and never written anywhere.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request

from tqdm.auto import tqdm

SYSTEM = ("You grade answers of an AI assistant. Judge how helpful, correct, relevant and clear the answer "
          "is for the user's request; a short answer that is cut off mid-sentence is judged on what it says. "
          "Reply with a one-sentence reason, then the rating from 1 (useless) to 10 (excellent) in the form "
          "[[N]].")
RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
RETRIES = 3  # tries per answer: hosted APIs answer bursts with 429, busy servers with 503
BACKOFF_S = 2.0  # wait before the second try, doubled before each further one (unless the server says Retry-After)
MAX_WAIT_S = 60.0  # the longest Retry-After honoured


class JudgeError(ValueError):
    """The judge endpoint cannot be used as configured: printed without a traceback."""


def endpoint(url: str) -> str:
    """The chat-completions URL for a base URL (``.../v1``) or the full one; a query (``?api-version=...``)
    stays at the end."""
    base, q, query = url.partition("?")
    base = base.rstrip("/")
    return (base if base.endswith("/chat/completions") else base + "/chat/completions") + q + query


def _post(url: str, payload: dict, key: str | None, timeout: float) -> dict:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(endpoint(url), data=json.dumps(payload).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - the user names the endpoint
        return json.loads(r.read().decode())


def _ask(url: str, model: str, key: str | None, user: str, timeout: float) -> str:
    payload = {"model": model, "temperature": 0, "max_tokens": 256,
               "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]}
    reply = _post(url, payload, key, timeout)
    try:
        content = reply["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"not a chat-completions reply: {str(reply)[:200]}") from None
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        content = "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    if not isinstance(content, str):
        raise ValueError(f"not a chat-completions reply (content is {type(content).__name__}): {str(reply)[:200]}")
    return content


SECRET_PARAMS = re.compile(r"key|token|secret|sig|pass|auth|cred", re.I)


def shown(url: str) -> str:
    """``url`` as it may be logged or written to metrics.json: a password in it and the values of query
    parameters named like secrets (``?key=``, ``access_token=``, ``sig=``) replaced by ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            netloc = f"{parts.username}:***@{netloc.rsplit('@', 1)[1]}"
        query = urllib.parse.urlencode([(k, "***" if SECRET_PARAMS.search(k) else v)
                                        for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)],
                                       safe="*")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:  # not parseable: show only its scheme and host part, if any
        return re.sub(r"//[^/@]*@", "//***@", url.split("?", 1)[0])


def api_key(env_name: str) -> str | None:
    return os.environ.get(env_name) or None


def check(url: str, model: str, key_env: str, timeout: float = 30.0) -> None:
    """One small request, before any long work: a clear :class:`JudgeError` if the endpoint cannot serve."""
    if not model:
        raise JudgeError("--judge-url needs --judge-model (the model name the endpoint serves)")
    try:
        _ask_tries(url, model, api_key(key_env), "Reply with [[10]].", timeout)
    except urllib.error.HTTPError as e:
        hint = f"; set {key_env} to the API key" if e.code in (401, 403) and not api_key(key_env) else ""
        raise JudgeError(f"--judge-url {shown(url)}: the endpoint answered HTTP {e.code} "
                         f"({e.reason}{_said(e)}){hint}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise JudgeError(f"--judge-url {shown(url)}: cannot reach an OpenAI-compatible chat-completions endpoint "
                         f"({reason}); check the URL (e.g. http://host:8000/v1) or drop --judge-url") from None


def _said(e: urllib.error.HTTPError) -> str:
    """The server's own words on an HTTP error (an unknown model, an unsupported parameter), short."""
    try:
        raw = e.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return ""
    try:
        err = json.loads(raw).get("error", raw)  # OpenAI's {"error": {"message": ...}}, or {"error": "..."}
        msg = err.get("message", err) if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        msg = raw
    msg = " ".join(str(msg).split())[:300]
    return f": {msg}" if msg else ""


def rate(url: str, model: str, key: str | None, question: str, answer: str, timeout: float = 60.0) -> float | None:
    """The judge's 1–10 rating of ``answer`` to ``question``; None when it gives none."""
    user = f"[User request]\n{question}\n\n[Assistant answer]\n{answer}\n\nRate the answer."
    try:
        text = _ask_tries(url, model, key, user, timeout)
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError):  # HTTPException: cut short
        return None
    return rating(text)


def rating(reply: str) -> float | None:
    """The rating in a judge's ``reply``: its last ``[[N]]`` (the reason comes first and may quote the answer's
    own ``[[...]]``), None when there is none or it is outside 1–10."""
    found = RATING.findall(reply)
    if not found:
        return None
    value = float(found[-1])
    return value if 1.0 <= value <= 10.0 else None


def _ask_tries(url: str, model: str, key: str | None, user: str, timeout: float) -> str:
    """:func:`_ask`, tried again (up to ``RETRIES`` tries) while it fails in a way that may pass; else its error."""
    for attempt in range(RETRIES - 1):
        try:
            return _ask(url, model, key, user, timeout)
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            if not _transient(e):
                raise
            time.sleep(_wait(e, attempt))
    return _ask(url, model, key, user, timeout)


def _transient(e: Exception) -> bool:
    """A failure that may pass on another try: 408, 429, 5xx, or a connection reset or cut short (not one
    refused: a server that is down would cost every answer the whole backoff)."""
    if isinstance(e, urllib.error.HTTPError):
        return e.code in (408, 429) or e.code >= 500
    if isinstance(e, urllib.error.URLError):
        e = e.reason
    return isinstance(e, (ConnectionError, http.client.HTTPException)) and not isinstance(e, ConnectionRefusedError)


def _wait(e: Exception, attempt: int) -> float:
    after = (e.headers.get("Retry-After") or "").strip() if isinstance(e, urllib.error.HTTPError) and e.headers else ""
    if after.isdigit():  # seconds (an HTTP date is not worth parsing: backoff then)
        return min(float(after), MAX_WAIT_S)
    return BACKOFF_S * 2 ** attempt


def judge_answers(url: str, model: str, key_env: str, questions: list[str], answers: dict[str, list[str]],
                  disable: bool = False) -> dict[str, dict]:
    """``{model name: {"judge_score": mean rating or None, "judged": n, "unrated": n}}`` for each answer list."""
    key = api_key(key_env)
    out = {}
    total = sum(len(a) for a in answers.values())
    with tqdm(total=total, desc="LLM judge", unit="answer", disable=disable) as bar:
        for name, texts in answers.items():
            if len(texts) != len(questions):
                raise ValueError(f"{name}: {len(texts)} answers for {len(questions)} questions")
            ratings = []
            for q, a in zip(questions, texts):
                ratings.append(rate(url, model, key, q, a))
                bar.update(1)
            got = [r for r in ratings if r is not None]
            out[name] = {"judge_score": sum(got) / len(got) if got else None, "judged": len(got),
                         "unrated": len(ratings) - len(got)}
    return out
