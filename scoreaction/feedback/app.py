"""The labeling web app: two samples side by side, the labeler says which is better.

    GET  /                      the page (static/index.html; static/app.js and app.css beside it)
    GET  /static/{name}         one of the page's own files, held in memory (nothing else is served)
    GET  /api/next              the next pair for this labeler: {"done": false, "left": {...}, "right": {...}, ...}
    POST /api/answer            {"left": id, "right": id, "choice": "left|right|tie|skip", "response_ms": 1234}
    POST /api/undo              delete this labeler's latest answer and return its pair, to be shown again
    GET  /api/progress          {"labeler", "answered", "queued", "remaining"}
    GET  /api/items/{id}.png    one item, drawn (render.py)

Every /api route needs `Authorization: Bearer <token>` (a token from `scoreaction feedback
add-labeler`; only its hash is stored) and answers 401 without a valid one. The page reads the token
once from `?token=...`, keeps it in sessionStorage and removes it from the address bar. Errors are
JSON {"error": message}: 400 malformed JSON (or not a JSON object, or not sent as application/json),
401 token, 404 unknown route or item, 409 pair already answered or not awaiting this labeler's answer,
413 body over `max_body` bytes (64 KiB), 422 wrong fields or values, 429 answered too fast (with
Retry-After), 503 the store cannot be read. FastAPI reads the body before it checks the token, so a
body over the limit (413) or one that is not JSON (400) is refused first.

The app answers only what it asked: GET /api/next records the pair it shows as served to that labeler
(store.serve), and POST /api/answer is accepted only for a pair served to that labeler and not yet
answered by them; anything else is a 409 and nothing is stored. The time to answer is measured by the
server, from when the pair was served (the page's own `response_ms` is not trusted and not stored). An
answer sooner than `min_response_ms` (200 ms: quicker than a person can look at two samples) after the
pair was served, or after that labeler's previous answer, is refused with a 429, as crowd-labeling
platforms reject "speeders": the pair stays served, so the labeler answers it again after a look, and
one token cannot answer faster than one pair per `min_response_ms`. POST /api/undo serves its pair again.
No request reaches the file system: items are addressed by integer id and read from the store, static
files are read into memory when the app is built.
"""

from __future__ import annotations

import math
import random
import threading
from importlib import resources
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from scoreaction.config import shown
from scoreaction.feedback.render import Renderer
from scoreaction.feedback.store import (
    CHOICES,
    MIN_RESPONSE_MS,
    AlreadyAnswered,
    NotServed,
    PreferenceStore,
    StoreError,
    TooFast,
    UnknownItem,
)

MAX_BODY = 64 * 1024
QUESTION = "Which sample do you prefer?"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def decimal_id(text):
    """Only ASCII digits make an item id in a path ('1.0', ' 1', '+1' or '١' do not), 19 at most."""
    if not (isinstance(text, str) and text.isascii() and text.isdigit() and len(text) <= 19):
        raise ValueError("an item id is a decimal integer")
    return text


ItemId = Annotated[int, BeforeValidator(decimal_id), Path(le=2**63 - 1)]  # SQLite's integers


class Answer(BaseModel):
    """The body of POST /api/answer (static/app.js sends it): the pair as shown, and the choice."""

    model_config = ConfigDict(extra="forbid", strict=True)  # strict: "1", true and 2.0 are not ids
    left: int = Field(description="an item id (integer)")
    right: int = Field(description="an item id (integer)")
    choice: Literal[CHOICES] = Field(description=f"one of {list(CHOICES)}")
    response_ms: Annotated[float, Field(ge=0, lt=1e9, allow_inf_nan=False)] | None = Field(
        None, description="a number of milliseconds >= 0 (or null)")  # the page's measure; the server keeps its own


class Labeling:
    """What the routes share (app.state.labeling): the store, its renderer, the question, the page's
    files, the randomness of pairs and the quickest answer accepted."""

    def __init__(self, store: PreferenceStore, question: str, seed: int | None, min_response_ms: float):
        self.store, self.question, self.min_response_ms = store, question, min_response_ms
        self.renderer = Renderer(store)
        self.static = load_static()
        self._rng, self._rng_lock = random.Random(seed), threading.Lock()

    def pair_rng(self) -> random.Random:
        """A generator for one request, drawn from the app's (seeded) one."""
        with self._rng_lock:
            return random.Random(self._rng.getrandbits(64))

    def pair(self, left: int, right: int) -> dict:
        """What the page shows of a pair: both items (id, kind, caption), the task and the prompt."""
        meta = self.store.item(left)
        condition = meta["condition"]
        prompt = (f"class {condition}" if isinstance(condition, int) else condition) if condition is not None else None
        return {"left": self.renderer.describe(left), "right": self.renderer.describe(right), "task": meta["task"],
                "condition": condition, "prompt": prompt}


def load_static() -> dict[str, tuple[bytes, str]]:
    """The page's own files, read once from the package folder: {name: (bytes, media type)}."""
    folder = resources.files("scoreaction.feedback") / "static"
    out = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in STATIC_TYPES:
            out[entry.name] = (entry.read_bytes(), STATIC_TYPES[suffix])
    if "index.html" not in out:
        raise RuntimeError(f"the labeling page is missing from {folder}")
    return out


# --- dependencies ------------------------------------------------------------------------------------
def labeling(request: Request) -> Labeling:
    return request.app.state.labeling


bearer = HTTPBearer(auto_error=False, description="a labeler's token (`scoreaction feedback add-labeler`)")


def labeler(state: Annotated[Labeling, Depends(labeling)],
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    """The name of the labeler whose token the request carries; 401 without a valid one."""
    if credentials is None:
        raise HTTPException(401, "missing token: send the header 'Authorization: Bearer <token>' "
                                 "(tokens come from `scoreaction feedback add-labeler`)",
                            headers={"WWW-Authenticate": "Bearer"})
    name = state.store.labeler_for_token(credentials.credentials)
    if name is None:
        raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
    return name


State = Annotated[Labeling, Depends(labeling)]
Labeler = Annotated[str, Depends(labeler)]


# --- routes ------------------------------------------------------------------------------------------
pages = APIRouter()
api = APIRouter(prefix="/api", dependencies=[Depends(labeler)])  # every /api route needs a token


@pages.get("/")
def index(state: State) -> Response:
    body, media_type = state.static["index.html"]
    return Response(body, media_type=media_type)


@pages.get("/static/{name}")
def static_file(name: str, state: State) -> Response:
    if name not in state.static:
        raise HTTPException(404, "not found")
    body, media_type = state.static[name]
    return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})


@api.get("/next")
def next_pair(who: Labeler, state: State) -> dict:
    rng = state.pair_rng()
    pair = state.store.next_pair(who, rng=rng)
    progress = state.store.progress(who)
    if pair is None:
        return {"done": True, "progress": progress, "question": state.question}
    left, right = pair if rng.random() < 0.5 else pair[::-1]  # no side is favoured
    state.store.serve(who, left, right)
    return {"done": False, **state.pair(left, right), "progress": progress, "question": state.question}


@api.post("/answer")
def answer(body: Answer, who: Labeler, state: State) -> dict:
    try:
        cid, response_ms = state.store.answer_served(body.left, body.right, body.choice, who,
                                                     min_response_ms=state.min_response_ms)
    except (AlreadyAnswered, NotServed) as err:
        raise HTTPException(409, str(err)) from None
    except TooFast as err:
        retry_after = str(max(1, math.ceil(err.wait_ms / 1000)))
        raise HTTPException(429, str(err), headers={"Retry-After": retry_after}) from None
    except StoreError:
        raise
    except ValueError as err:  # unknown item, a pair across tasks, an id beyond 64 bits
        raise HTTPException(422, str(err)) from None
    return {"id": cid, "response_ms": response_ms, "progress": state.store.progress(who)}


@api.post("/undo")
def undo(who: Labeler, state: State) -> dict:
    removed = state.store.undo_last(who, serve_again=True)
    payload = {"undone": None, "progress": state.store.progress(who)}
    if removed is not None:
        payload["undone"] = {k: removed[k] for k in ("left", "right", "choice")}
        payload.update(state.pair(removed["left"], removed["right"]))
    return payload


@api.get("/progress")
def progress(who: Labeler, state: State) -> dict:
    return state.store.progress(who)


@api.get("/items/{item_id}.png")
def item_png(item_id: ItemId, state: State) -> Response:
    try:
        return Response(state.renderer.png(item_id), media_type="image/png")
    except UnknownItem as err:
        raise HTTPException(404, str(err)) from None


# --- errors, limits, headers -------------------------------------------------------------------------
def validation_error(errors: list[dict]) -> tuple[int, str]:
    """(status, message) for what FastAPI found wrong with a request: see the module docstring."""
    if any(e["loc"][0] == "path" for e in errors):  # /api/items/<not a 64-bit id>.png
        return 404, "not found: items are /api/items/<integer id>.png"
    for e in errors:
        if e["type"] == "json_invalid":
            return 400, f"malformed JSON: {e.get('ctx', {}).get('error', e['msg'])}"
        if tuple(e["loc"]) == ("body",):
            if e["type"] == "missing":
                return 400, "malformed JSON: the body is empty"
            if isinstance(e["input"], bytes):  # not parsed: no JSON Content-Type
                return 400, "malformed JSON: send a JSON object with 'Content-Type: application/json'"
            return 400, f"expected a JSON object, found {type(e['input']).__name__}"
    extra = [e["loc"][-1] for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        return 422, f"unknown field {extra[0]!r}; expected {sorted(Answer.model_fields)}"
    fields = list(Answer.model_fields)
    e = min(errors, key=lambda e: fields.index(e["loc"][-1]) if e["loc"][-1] in fields else len(fields))
    name = e["loc"][-1]
    rule = Answer.model_fields[name].description if name in fields else e["msg"]
    return 422, f"{name} must be {rule}, found {shown(None if e['type'] == 'missing' else e.get('input'))}"


class BodyLimit:
    """413 for a request body over `limit` bytes: refused unread when its Content-Length says so, else
    counted as it is read (a chunked body), failing the read that passes the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and (len(declared) > 18 or int(declared) > self.limit):
            size = declared if len(declared) <= 18 else "over 10**18"
            response = JSONResponse({"error": f"request body of {size} bytes exceeds the limit of {self.limit} bytes"},
                                    status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, f"request body exceeds the limit of {self.limit} bytes")
            return message

        await self.app(scope, counted_receive, send)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    detail = str(exc.detail)
    cause = exc.__cause__  # FastAPI could not parse the body: bad UTF-8, nested too deep, an integer too long
    if exc.status_code == 400 and isinstance(cause, RecursionError):
        detail = "malformed JSON: nested too deeply"
    elif exc.status_code == 400 and isinstance(cause, ValueError):
        detail = f"malformed JSON: {str(cause).split(';')[0]}"
    return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    status, message = validation_error(list(exc.errors()))
    return JSONResponse({"error": message}, status_code=status)


async def store_error(request: Request, exc: StoreError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=503)


async def security_headers(request: Request, call_next) -> Response:
    response = await call_next(request)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = CSP
    if request.url.path.startswith("/api/"):
        response.headers["Cache-Control"] = "no-store"
    return response


def create_app(store: PreferenceStore | str, *, question: str = QUESTION, max_body: int = MAX_BODY,
               seed: int | None = None, min_response_ms: float = MIN_RESPONSE_MS) -> FastAPI:
    """The labeling app over one preference store (a PreferenceStore or the path of an existing one).
    `seed` fixes the random pairs and which item of a pair is shown on the left; an answer sooner than
    `min_response_ms` after its pair was served (or after the labeler's previous answer) is refused."""
    store = store if isinstance(store, PreferenceStore) else PreferenceStore(store)
    app = FastAPI(title="scoreaction labeling", docs_url=None, redoc_url=None, openapi_url=None,
                  exception_handlers={HTTPException: http_error, RequestValidationError: invalid_request,
                                      StoreError: store_error})
    app.state.store, app.state.labeling = store, Labeling(store, question, seed, min_response_ms)
    app.include_router(pages, include_in_schema=False)
    app.include_router(api)
    app.add_middleware(BodyLimit, limit=max_body)
    app.middleware("http")(security_headers)  # outside BodyLimit: its 413 gets the headers too
    return app
