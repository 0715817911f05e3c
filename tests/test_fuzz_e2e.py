"""Generated bodies, paths, queries and proofs thrown at every public and internal endpoint of a live 1P1D
deployment (`disaggctl up`, Mooncake TCP on loopback): no answer may be a 5xx that a healthy deployment
cannot justify, no process may die, and afterwards greedy requests still equal transformers with every KV
page back in its pool.

Where a 5xx could be legitimate, and why none is here:
- a runtime server answers 503 only while loading or stopping, and 500 only for an engine failure: both
  workers are up the whole time, so neither is allowed;
- the proxy answers 502/503/504 for an upstream that is unreachable, failed or out of rotation: accepted only
  when a worker really is dead or failing its /health at that moment (never, unless something crashed);
- the prefill bootstrap answers 503 with too many open rooms (at least 64; these tests hold at most one) and
  504 when a registration is never paired (after 60 s; held registrations are closed after HOLD_S).
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass
from urllib.parse import quote, urlencode, urlsplit

import psutil
import pytest
from conftest import wait_for
from hf_reference import hf_greedy
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from test_pd_e2e import greedy, metrics, model_dir, post, prompt  # noqa: F401
from test_security_e2e import deployment_key, pd, signed_get  # noqa: F401

from disaggctl.transfer.bootstrap import DecodeRegistration, parse_room
from disaggctl.transfer.kv_layout import KvLayout
from disaggctl.trust import HEADER, DeploymentKey

pytestmark = pytest.mark.slow

CALL_TIMEOUT_S = 30.0
# A registration that the bootstrap accepts stays open until the prefill pairs it (never, here): closing it
# after this long is how a decode that gives up looks.
HOLD_S = 0.3
# Generated generation requests really run: this many new tokens at most keeps each one short.
MAX_NEW = 8
# Below this the model's context always has room, so such a value would run a long generation.
CONTEXT = 1024


def fuzz(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# ---- HTTP ----


@dataclass
class Answer:
    status: int  # -1: no whole answer (connection broken, or the timeout)
    body: bytes
    content_type: str
    headers: dict
    timed_out: bool = False


def send(
    base: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict | None = None,
    timeout: float = CALL_TIMEOUT_S,
) -> Answer:
    """One request on its own connection, its answer read to the end (streams included), never raising:
    a broken or silent connection is an answer too, one the checks refuse."""
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return Answer(r.status, r.read(), r.getheader("Content-Type", ""), dict(r.getheaders()))
    except TimeoutError as e:
        return Answer(-1, repr(e).encode(), "", {}, timed_out=True)
    except (http.client.HTTPException, OSError) as e:
        return Answer(-1, repr(e).encode(), "", {})
    finally:
        conn.close()


def worker_urls(d) -> dict[str, str]:
    urls = {n: p["url"] for n, p in d.procs.items() if p["role"] in ("prefill", "decode")}
    urls["bootstrap"] = f"http://127.0.0.1:{d.procs['prefill-0']['bootstrap_port']}"
    return urls


def upstream_unavailable(d) -> bool:
    for name, url in worker_urls(d).items():
        if name in d.procs and not psutil.pid_exists(d.procs[name]["pid"]):
            return True
        if send(url, "GET", "/health", timeout=5).status != 200:
            return True
    return False


def check(d, a: Answer, where: str, proxy: bool = False) -> None:
    """No 5xx (see the module's docstring for the proxy's exception), no broken answer, no error event
    of a 5xx inside a stream."""
    if currently_in_test_context():  # how many got past the checks: --hypothesis-show-statistics
        event(f"{where.split(' /')[0]}: {a.status}")
    said = a.body[:600]
    assert a.status != -1, f"{where}: no answer: {said!r}"
    if a.status >= 500:
        legit = proxy and a.status in (502, 503, 504) and upstream_unavailable(d)
        assert legit, f"{where} answered {a.status}: {said!r}"
    if a.content_type == "text/event-stream":
        events = [ln[5:].strip() for ln in a.body.split(b"\n") if ln.startswith(b"data:")]
        assert events and events[-1] == b"[DONE]", f"{where}: the stream did not end with [DONE]: {said!r}"
        for ev in events[:-1]:
            err = json.loads(ev).get("error")
            if err is not None:
                code = err.get("code", 500)
                legit = proxy and code in (502, 503, 504) and upstream_unavailable(d)
                assert code < 500 or legit, f"{where}: error event in the stream: {ev[:600]!r}"


def as_bytes(body) -> bytes:
    # NaN and Infinity are sent as Python writes them: not JSON, which is the point.
    return json.dumps(body).encode()


# ---- strategies ----
#
# Every field is right most of the time and wrong now and then, so that most bodies are wrong in one or two
# places: a body wrong everywhere is refused by the first check and fuzzes nothing behind it. About a third
# of the generation requests are valid and really run.

ABSENT = object()


# The rare choice is the last: hypothesis leans a little towards the first.
def mostly(valid, wrong, one_in: int = 8):
    """`valid`, except one time in `one_in` (about) `wrong`."""
    return st.sampled_from(range(one_in)).flatmap(lambda i: wrong if i == one_in - 1 else valid)


def sometimes(value, one_in: int = 3):
    """A field that is present one time in `one_in` (about)."""
    return st.sampled_from(range(one_in)).flatmap(lambda i: value if i == one_in - 1 else st.just(ABSENT))


def objects(fields: dict):
    return st.fixed_dictionaries(fields).map(lambda d: {k: v for k, v in d.items() if v is not ABSENT})


def merged(*parts):
    return st.tuples(*parts).map(lambda ds: {k: v for d in ds for k, v in d.items()})


# Lone surrogates are valid in JSON text ("\ud800") and invalid in UTF-8: now and then in every string.
chars = mostly(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), one_in=40)
texts = st.text(chars, max_size=24)
ints = st.integers(min_value=-(2**70), max_value=2**70)
scalars = st.none() | st.booleans() | ints | st.floats() | texts
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=10,
)


def wrong(*values):
    """Values a field must refuse: the ones given (boundaries), or any JSON at all."""
    return st.sampled_from(values) | json_values if values else json_values


def knob(valid, *bad):
    return sometimes(mostly(valid, wrong(*bad)))


prompt_texts = st.text(chars, min_size=1, max_size=30)
prompt_ids = st.lists(st.integers(0, 1023), min_size=1, max_size=12)
bad_ids = wrong([], [-1], [1024], [2**70], [1.5], ["1"], [True], [[1]])
# Never a runnable budget when wrong: None, or a small number, would mean a long generation.
bad_budgets = wrong(0, -1, CONTEXT, 2**70, 4.0, "4", True, [4]).filter(
    lambda v: v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 0 < v < CONTEXT)
)
budgets = mostly(st.integers(1, MAX_NEW), bad_budgets)
sampling_knobs = {
    "temperature": knob(st.floats(0, 2) | st.just(0), -0.1, 100.5, "0", True),
    "top_p": knob(st.floats(0, 1, exclude_min=True), 0, 1.5, -1),
    "top_k": knob(st.integers(-1, 2000).filter(bool), 0, -2, 2**70, 1.0),
    "stop": knob(
        st.lists(st.text(chars, min_size=1, max_size=4), max_size=4) | st.text(chars, min_size=1, max_size=4),
        "",
        [""],
        ["a"] * 17,
        ["a" * 513],
        [1],
    ),
    "stop_token_ids": knob(st.lists(st.integers(0, 1100), max_size=3), [-1], [2**70], [1.5], 2),
    "ignore_eos": knob(st.booleans(), 0, "true"),
    "seed": knob(st.integers(0, 2**63 - 1), -1, 2**63, 2**64, 1.5),
    "skip_special_tokens": knob(st.booleans(), 1, None),
}
# The proxy replaces these; a worker refuses them without its proof.
bootstrap = {
    "bootstrap_host": sometimes(st.sampled_from(["127.0.0.1", "localhost", "[::1]", ""]) | json_values, 8),
    "bootstrap_port": sometimes(st.integers(-1, 70000) | json_values, 8),
    "bootstrap_room": sometimes(ints | json_values, 8),
}
rare = {"bogus": sometimes(json_values, 40), "": sometimes(json_values, 80)}
rids = knob(st.text(chars, min_size=1, max_size=16), "", "x" * 257, 5)
streams = knob(st.booleans(), 0, "true", None)

prompt_shapes = [
    *[objects({"text": mostly(prompt_texts, wrong("", 5, ["a"]))})] * 3,
    *[objects({"input_ids": mostly(prompt_ids, bad_ids)})] * 3,
    objects({"text": prompt_texts, "input_ids": prompt_ids}),
    st.just({}),
]
generate_bodies = merged(
    st.sampled_from(range(len(prompt_shapes))).flatmap(lambda i: prompt_shapes[i]),
    objects(
        {
            # Never falsy when wrong: `"sampling_params": 0` would mean the default budget.
            "sampling_params": mostly(
                objects({"max_new_tokens": budgets, **sampling_knobs, **rare}), json_values.filter(bool)
            ),
            "stream": streams,
            "rid": rids,
            "model": sometimes(json_values, 4),
            **bootstrap,
            **rare,
        }
    ),
)
openai_common = {
    "model": sometimes(wrong("", "gpt-4"), 10),
    "stream": streams,
    "stream_options": knob(
        objects(
            {
                "include_usage": knob(st.booleans(), 1, "yes"),
                "continuous_usage_stats": sometimes(json_values, 4),
                **rare,
            }
        ),
        [],
        "include_usage",
    ),
    "n": knob(st.just(1), 0, 2, 1.0),
    "user": sometimes(texts, 4),
    "rid": rids,
    "logprobs": knob(st.sampled_from([None, False, 0]), True, 1),
    "presence_penalty": knob(st.sampled_from([0, 0.0]), 1, 0.5),
    "frequency_penalty": knob(st.sampled_from([0, 0.0]), 1, -0.5),
    **sampling_knobs,
    **bootstrap,
    **rare,
}
prompts = mostly(
    prompt_texts
    | prompt_ids
    | st.lists(prompt_texts, min_size=1, max_size=1)
    | st.lists(prompt_ids, max_size=1),
    wrong("", [], [""], [[]], [1, "a"], ["a", "b"], [[1], [2]], [-1], 5),
)
completion_bodies = objects(
    {
        "prompt": prompts,
        "max_tokens": budgets,
        "echo": knob(st.just(False), True),
        "best_of": knob(st.just(1), 2, 0),
        **openai_common,
    }
)
content_parts = st.lists(
    objects(
        {
            "type": mostly(st.just("text"), wrong("image_url", "")),
            "text": mostly(texts, wrong(None, 1)),
            "image_url": sometimes(json_values, 8),
        }
    ),
    max_size=3,
)
messages = mostly(
    st.lists(
        mostly(
            objects(
                {
                    "role": mostly(
                        st.sampled_from(["system", "user", "assistant", "developer", "tool"]),
                        wrong("", "User", None, 1),
                    ),
                    "content": mostly(texts | content_parts, wrong(None, 1, [1], {"text": "a"})),
                    "name": sometimes(texts | json_values, 6),
                }
            ),
            wrong("hi", None, []),
        ),
        min_size=1,
        max_size=3,
    ),
    wrong([], "hi", {"role": "user", "content": "hi"}),
)
chat_bodies = objects(
    {
        "messages": messages,
        "max_tokens": budgets,
        "max_completion_tokens": sometimes(budgets, 4),
        "top_logprobs": knob(st.sampled_from([None, 0]), 1),
        **openai_common,
    }
)
BODIES = {
    "/generate": generate_bodies,
    "/v1/completions": completion_bodies,
    "/v1/chat/completions": chat_bodies,
}
GENERATION_PATHS = tuple(BODIES)


def _truncated(body: dict):
    raw = json.dumps(body).encode()
    return st.integers(0, max(0, len(raw) - 1)).map(lambda n: raw[:n])


def _nested(depth: int, open_: str, close: str, inner: str = "1") -> bytes:
    return (open_ * depth + inner + close * depth).encode()


raw_bodies = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [
            b"",
            b"null",
            b"[]",
            b'"text"',
            b'{"text": "\xff\xfe"}',  # not UTF-8
            b'\xef\xbb\xbf{"text": "a"}',  # a BOM before the object
            b'{"text": "\\ud800", "sampling_params": {"max_new_tokens": 2}}',
            b'{"input_ids": [1e400], "sampling_params": {"max_new_tokens": 2}}',
            b'{"input_ids": [5], "sampling_params": {"max_new_tokens": 1e400}}',
            b'{"input_ids": [5], "sampling_params": {"max_new_tokens": 2, "temperature": NaN}}',
            b'{"input_ids": [5], "sampling_params": {"max_new_tokens": 2, "top_p": Infinity}}',
            b'{"input_ids": [5], "sampling_params": {"max_new_tokens": 2, "seed": -Infinity}}',
            b'{"prompt": [5], "max_tokens": NaN}',
            b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}',
            b'{"input_ids": [' + b"9" * 5000 + b"]}",  # past CPython's int-from-string limit
            b'{"input_ids": [5], "sampling_params": {"max_new_tokens": 2}, "rid": "a", "rid": 1}',
            b'{"input_ids": [5], "sampling_params": {"max_new_tokens": 2}}  trailing',
            _nested(63, "[", "]"),
            _nested(65, "[", "]"),
            _nested(100_000, "[", "]"),
            b'{"a": ' * 70 + b"1" + b"}" * 70,
            b'{"text": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001,
        ]
    ),
    st.sampled_from(
        [
            {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}, "stream": True},
            {"prompt": "abc", "max_tokens": 2},
        ]
    ).flatmap(_truncated),
    json_values.map(as_bytes),
)


def any_body(path: str):
    return mostly(BODIES[path].map(as_bytes), raw_bodies, one_in=4)


# Room path segments: valid ids, out-of-range and signed numbers, non-ASCII digits, anything.
rooms = (
    st.integers(0, 2**63 - 1).map(str)
    | st.integers(0, 20).map(str)
    | ints.map(str)
    | st.sampled_from(["9" * 19, "9" * 20, "0" * 30, "01", "+1", " 1", "1.0", "1e3", "١٢", "²", ".", ".."])
    | st.text(chars, min_size=1, max_size=12)
)


def room_path(room: str, cancel: bool) -> str:
    path = "/v1/kv/" + quote(room.encode("utf-8", "surrogatepass"), safe="")
    return path + "/cancel" if cancel else path


def bad_proofs(key: DeploymentKey, method: str, path: str, body: bytes):
    """Header values that do not prove this request: absent, garbage, shaped right but wrong, stale,
    another deployment's, or a real proof of a different call."""
    other = DeploymentKey(b"\x01" * 32)
    now = int(time.time())
    shaped = st.builds(
        lambda v, t, s: f"{v} t={t} s={s}",
        st.sampled_from(["v1", "v2", ""]),
        # Printable only: a control character is refused by the HTTP parser before any handler runs.
        st.integers(-1, 10**13).map(str)
        | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=14),
        st.text("0123456789abcdef", min_size=60, max_size=66),
    )
    return st.one_of(
        st.none(),
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=90),
        shaped,
        st.just(key.sign(method, path, body, now=now - 10_000)),  # stale
        st.just(key.sign(method, path, body, now=now + 10_000)),  # from the future
        st.just(other.sign(method, path, body)),
        st.just(key.sign(method, path, body + b" ")),
        st.just(key.sign("GET" if method == "POST" else "POST", path, body)),
        st.just(key.sign(method, path + "x", body)),
    ).map(lambda h: {} if h is None else {HEADER: h})


# ---- the deployment's health, checked after every test ----


def assert_still_serving(d, model: str) -> None:
    res = d.run("status", "--json", timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    for p in json.loads(res.stdout)["processes"]:
        assert p["alive"] and psutil.pid_exists(p["pid"]), f"{p['name']} died:\n{d.logs()}"
        assert p["pid"] == d.procs[p["name"]]["pid"], f"{p['name']} was restarted"
    for name, url in {"proxy": d.proxy, **worker_urls(d)}.items():
        assert send(url, "GET", "/health").status == 200, name
    for n, seed in ((9, 31), (22, 32)):
        ids = prompt(n, seed)
        status, body = post(d.proxy + "/generate", greedy(ids, MAX_NEW))
        assert status == 200 and body["output_ids"] == hf_greedy(model, ids, MAX_NEW), body
    ids = prompt(13, 33)
    streamed = send(d.proxy, "POST", "/generate", as_bytes({**greedy(ids, MAX_NEW), "stream": True}))
    check(d, streamed, "a good streamed request", proxy=True)
    last = json.loads([ln for ln in streamed.body.split(b"\n") if ln.startswith(b"data:")][-2][5:])
    assert last["output_ids"] == hf_greedy(model, ids, MAX_NEW)
    urls = worker_urls(d)

    def settled():
        ms = {name: metrics(urls[name]) for name in ("prefill-0", "decode-0")}
        done = all(m["kv_pages_used"] == 0 and m["kv_pages_quarantined"] == 0 for m in ms.values())
        return done and ms["prefill-0"]["kv_open_rooms"] == 0 and ms

    wait_for(settled, 60, "every KV page back in its pool and no room open")


@pytest.fixture
def intact(pd, model_dir):  # noqa: F811
    yield pd
    assert_still_serving(pd, model_dir)


@pytest.fixture(scope="module")
def announced(pd):  # noqa: F811
    """The decode's session and pool layout, as a registration of its own names them."""
    status, raw, _ = signed_get(pd.url("decode-0"), "/internal/kv_layout", deployment_key(pd))
    assert status == 200
    # One pool per tensor-parallel rank; rank 0's session names the decode.
    first = json.loads(raw)["ranks"][0]
    return {"session_id": first["session_id"], "layout": first["layout"]}


# ---- proxy ----


@pytest.mark.parametrize("path", GENERATION_PATHS)
@fuzz(400)
@given(data=st.data())
def test_proxy_generation_routes(intact, path, data):
    body = data.draw(any_body(path), label="body")
    check(intact, send(intact.proxy, "POST", path, body), f"proxy POST {path}", proxy=True)


GET_ROUTES = {
    "proxy": ["/health", "/metrics", "/v1/models", "/server_info", "/workers", "/health_generate"],
    "prefill-0": ["/health", "/metrics", "/v1/models", "/server_info"],
    "decode-0": ["/health", "/metrics", "/v1/models", "/server_info"],
    "bootstrap": ["/health"],
}
queries = st.dictionaries(
    st.sampled_from(["deep", "x", ""]) | texts, st.sampled_from(["1", "true", "0"]) | texts, max_size=3
).map(
    lambda q: (
        "?"
        + urlencode(
            {k.encode("utf-8", "surrogatepass"): v.encode("utf-8", "surrogatepass") for k, v in q.items()}
        )
        if q
        else ""
    )
)


@fuzz(150)
@given(data=st.data())
def test_informational_routes(intact, data):
    server = data.draw(st.sampled_from(sorted(GET_ROUTES)), label="server")
    path = data.draw(st.sampled_from(GET_ROUTES[server]), label="path") + data.draw(queries, label="query")
    method = data.draw(st.sampled_from(["GET", "GET", "POST", "PUT", "DELETE", "HEAD"]), label="method")
    body = data.draw(raw_bodies, label="body") if method in ("POST", "PUT") else None
    url = intact.proxy if server == "proxy" else worker_urls(intact)[server]
    a = send(url, method, path, body)
    check(intact, a, f"{server} {method} {path}", proxy=server == "proxy")
    if method == "GET":
        # A query string changes nothing about these routes (deep=1 probes the workers, all healthy).
        assert a.status == 200, f"{server} GET {path}: {a.status} {a.body[:300]!r}"


# ---- workers, called directly (no proof) ----


@pytest.mark.parametrize("worker", ["prefill-0", "decode-0"])
@fuzz(200)
@given(data=st.data())
def test_worker_generation_routes_without_proof(intact, worker, data):
    path = data.draw(st.sampled_from(GENERATION_PATHS), label="path")
    body = data.draw(any_body(path), label="body")
    a = send(intact.url(worker), "POST", path, body)
    check(intact, a, f"{worker} POST {path}")
    # Neither role serves a request without the proxy's bootstrap fields, nor takes those without a proof.
    assert a.status != 200, f"{worker} ran a request sent to it directly: {a.body[:300]!r}"


@fuzz(120)
@given(data=st.data())
def test_kv_layout_answers_only_a_proven_call(intact, data):
    key = deployment_key(intact)
    worker = data.draw(st.sampled_from(["decode-0", "prefill-0"]), label="worker")
    path = "/internal/kv_layout" + data.draw(queries, label="query")
    proven = data.draw(st.booleans(), label="proven")
    headers = (
        key.headers("GET", path) if proven else data.draw(bad_proofs(key, "GET", path, b""), label="hdr")
    )
    a = send(intact.url(worker), "GET", path, headers=headers)
    check(intact, a, f"{worker} GET {path}")
    if not proven:
        assert a.status == 401, (a.status, a.body[:300])
    elif worker == "prefill-0":
        assert a.status == 404, (a.status, a.body[:300])
    else:
        assert a.status == 200, (a.status, a.body[:300])
        # Signed for the route, whatever query the call carried.
        key.verify_answer("/internal/kv_layout", a.status, a.body, a.headers.get(HEADER))


# ---- the prefill's bootstrap ----


def registration_bodies(real: dict):
    layout = real["layout"]
    fields = sorted(layout)
    page_size, pages = layout["page_size"], layout["num_pages"]
    layouts = mostly(
        st.just(layout),
        st.builds(lambda k, v: {**layout, k: v}, st.sampled_from(fields), wrong(0, -1, 1.0, "4", 2**70, None))
        | st.sampled_from(fields).map(lambda k: {f: v for f, v in layout.items() if f != k})
        | json_values,
        one_in=3,
    )
    # The page ids a prompt of that many tokens needs, in the decode's pool: what a real decode sends.
    honest = st.integers(1, 24).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(
                st.integers(0, pages - 1),
                min_size=-(-n // page_size),
                max_size=-(-n // page_size),
                unique=True,
            ),
        )
    )
    dishonest = st.tuples(
        st.integers(-2, 24) | wrong(0, 1.0, "3"),
        st.lists(st.integers(-2, pages + 2), max_size=6)
        | st.lists(st.integers(0, 3), max_size=6)
        | json_values,
    )
    registrations = st.tuples(
        objects(
            {
                "session_id": mostly(
                    st.just(real["session_id"]),
                    # Shaped like a session, but no decode of this deployment's: the directory is asked.
                    mostly(st.sampled_from(["127.0.0.1:1", "10.0.0.1:15000", "[::1]:80"]), wrong(":", ""), 3),
                    one_in=3,
                ),
                "layout": layouts,
                **rare,
            }
        ),
        mostly(honest, dishonest, one_in=3),
    ).map(lambda t: {**t[0], "prompt_len": t[1][0], "page_ids": t[1][1]})
    too_large = {"session_id": real["session_id"], "page_ids": list(range(30_000))}
    return mostly(registrations.map(as_bytes), raw_bodies | st.just(as_bytes(too_large)), one_in=5)


def may_hold(room: str, body: bytes, real: dict) -> bool:
    """Whether the bootstrap may keep this registration open: it is one a decode of this deployment could
    have sent (the prefill then waits for the proxy's request for that room)."""
    try:
        reg = DecodeRegistration.from_json(parse_room(room), json.loads(body))
    except (ValueError, RecursionError, UnicodeDecodeError):
        return False
    return reg.session_id == real["session_id"] and reg.layout == KvLayout.from_dict(real["layout"])


def room_drained(d) -> bool:
    return metrics(d.url("prefill-0"))["kv_open_rooms"] == 0


@fuzz(200)
@given(data=st.data())
def test_bootstrap_refuses_every_unproven_call(intact, announced, data):
    key = deployment_key(intact)
    cancel = data.draw(st.booleans(), label="cancel")
    path = room_path(data.draw(rooms, label="room"), cancel)
    body = data.draw(registration_bodies(announced), label="body")
    headers = data.draw(bad_proofs(key, "POST", path, body), label="headers")
    a = send(worker_urls(intact)["bootstrap"], "POST", path, body, headers)
    check(intact, a, f"bootstrap POST {path}")
    # 400: not a room id (checked before the proof); 404: not a route once the segment is decoded.
    assert a.status in (400, 401, 404, 413), (a.status, a.body[:300])


@fuzz(150)
@given(data=st.data())
def test_bootstrap_registration_with_a_valid_proof(intact, announced, data):
    """The proof checks out, so everything behind it (room table, JSON, registration, directory) is fuzzed."""
    key = deployment_key(intact)
    room = data.draw(rooms, label="room")
    path = room_path(room, cancel=False)
    body = data.draw(registration_bodies(announced), label="body")
    hold = may_hold(room, body, announced)
    a = send(
        worker_urls(intact)["bootstrap"],
        "POST",
        path,
        body,
        key.headers("POST", path, body),
        timeout=HOLD_S if hold else CALL_TIMEOUT_S,
    )
    if hold and a.timed_out:
        event("bootstrap POST: held open")
        # Giving up on the registration ends the room at once: nothing stays held.
        wait_for(lambda: room_drained(intact), 10, "the abandoned room to be dropped")
        return
    check(intact, a, f"bootstrap POST {path}")
    assert a.status != 200, f"a room no request asked for was answered as written: {a.body[:300]!r}"
    if hold:
        assert a.status == 409, (a.status, a.body[:300])  # only a room used before answers at once
    if a.status != 404:  # aiohttp's own answer for a path no route matches; every other one is proven
        key.verify_answer(path, a.status, a.body, a.headers.get(HEADER))


@fuzz(120)
@given(data=st.data())
def test_bootstrap_cancel_with_a_valid_proof(intact, announced, data):
    key = deployment_key(intact)
    room = data.draw(rooms, label="room")
    path = room_path(room, cancel=True)
    body = data.draw(raw_bodies | registration_bodies(announced), label="body")
    a = send(worker_urls(intact)["bootstrap"], "POST", path, body, key.headers("POST", path, body))
    check(intact, a, f"bootstrap POST {path}")
    try:
        n = parse_room(room)
    except ValueError:
        assert a.status in (400, 404, 413), (a.status, a.body[:300])
        return
    if a.status == 200:
        key.verify_answer(path, 200, a.body, a.headers.get(HEADER))
        assert json.loads(a.body) == {"room": n, "write_in_flight": False}
    else:
        assert a.status == 413, (a.status, a.body[:300])


def test_the_deployment_is_intact_after_the_fuzzing(pd, model_dir):  # noqa: F811
    """Also checked after every test above; here on its own, so a report names it whatever the order."""
    assert_still_serving(pd, model_dir)
