"""The labeling web app: two samples side by side, the labeler says which is better.

    GET  /                      the page (static/index.html; static/app.js and app.css beside it)
    GET  /static/{name}         one of the page's own files, held in memory (nothing else is served)
    GET  /api/next              the next pair for this labeler: {"done": false, "left": {...}, "right": {...}, ...}
    POST /api/answer            {"left": id, "right": id, "choice": "left|right|tie|skip", "response_ms": 1234}
    POST /api/undo              delete this labeler's latest answer and return its pair, to be shown again
    GET  /api/progress          {"labeler", "answered", "queued", "remaining"}
    GET  /api/items/{id}.png    one item, drawn

Every /api route needs `Authorization: Bearer <token>` (a token from `scoreaction feedback
add-labeler`; only its hash is stored) and answers 401 without a valid one. The page reads the token
once from `?token=...`, keeps it in sessionStorage and removes it from the address bar. Errors are
JSON {"error": message}: 400 malformed JSON, 401 token, 404 unknown route or item, 409 pair already
answered, 413 body over `max_body` bytes (64 KiB), 422 wrong fields or values. No request reaches the
file system: items are addressed by integer id and read from the store, static files are read into
memory when the app is built.

How items are drawn (server side, with Pillow):
  image        (H, W), (C, H, W) or (H, W, C) with C in 1, 3, 4: float pixels in [-1, 1] (the
               diffusion convention; clipped), uint8 as they are; upscaled with nearest-neighbour
  point        (d,): one sample of a point task (`gaussian`, `mixture`) is one point, drawn as a large
               red dot over a faint cloud of every item of the same task and condition, on axes shared
               by all of them, so the two sides of a pair are drawn on the same axes; for d > 2 the
               first two coordinates are drawn and the caption lists them all
  point set    (N, 2): a scatter plot, on axes shared by the items of its task and condition
"""

from __future__ import annotations

import io
import json
import math
import random
import re
import threading
from importlib import resources

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from scoreaction.feedback.store import CHOICES, AlreadyAnswered, PreferenceStore, StoreError, UnknownItem

MAX_BODY = 64 * 1024
QUESTION = "Which sample do you prefer?"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
ITEM_ROUTE = re.compile(r"^([0-9]{1,12})\.png$")
ANSWER_FIELDS = {"left", "right", "choice", "response_ms"}


# --- drawing -----------------------------------------------------------------------------------------
def item_kind(shape: tuple) -> str:
    """'point', 'points' (an (N, 2) set), 'image' or 'unknown'; see the module docstring."""
    if len(shape) == 1 and shape[0] >= 1:
        return "point"
    if len(shape) == 2 and shape[1] == 2:
        return "points"
    if len(shape) == 2 or (len(shape) == 3 and (shape[0] in (1, 3, 4) or shape[-1] in (1, 3, 4))):
        return "image"
    return "unknown"


def caption(array: np.ndarray, kind: str) -> str:
    if kind == "point":
        values = ", ".join(f"{v:.3g}" for v in array[:8].tolist()) + (", ..." if array.size > 8 else "")
        return f"x = ({values})" + ("  [drawn: x1, x2]" if array.size > 2 else "")
    if kind == "points":
        return f"{array.shape[0]} points"
    if kind == "image":
        h, w = image_hwc(array).shape[:2]
        return f"{w}\u00d7{h} image"
    return f"array of shape {tuple(array.shape)}"


def image_hwc(array: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 pixels; floats are read as [-1, 1], channels-first wins when ambiguous."""
    a = array
    if a.ndim == 2:
        a = a[:, :, None]
    elif a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float64), nan=-1.0)
        return np.round((np.clip(a, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    if a.dtype.kind == "b":
        return a.astype(np.uint8) * 255
    return np.clip(a, 0, 255).astype(np.uint8)


def render_image(array: np.ndarray, size: int = 288) -> bytes:
    from PIL import Image

    pixels = image_hwc(array)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
    im = Image.fromarray(pixels[:, :, 0] if mode == "L" else pixels, mode)
    scale = max(1, size // max(im.size))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    return png_bytes(im)


def xy(points: np.ndarray) -> np.ndarray:
    """The first two coordinates of points (n, d); a 1-D point lies on the x axis."""
    points = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    return points[:, :2] if points.shape[1] >= 2 else np.concatenate([points, np.zeros_like(points)], 1)


def square_bounds(points: np.ndarray) -> tuple[float, float, float]:
    """(centre x, centre y, half-width) of a square window holding (robustly) all the points."""
    points = points[np.isfinite(points).all(1)]
    if len(points) == 0:
        return 0.0, 0.0, 1.0
    q = (0.5, 99.5) if len(points) >= 200 else (0, 100)
    lo, hi = np.percentile(points, q[0], axis=0), np.percentile(points, q[1], axis=0)
    half = max(float((hi - lo).max()) / 2 * 1.15, 1e-3)
    return float(lo[0] + hi[0]) / 2, float(lo[1] + hi[1]) / 2, half


def nice_step(span: float) -> float:
    raw = span / 7
    base = 10 ** math.floor(math.log10(raw))
    return next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= raw)


def render_scatter(highlight: np.ndarray | None, cloud: np.ndarray, bounds, size: int = 288) -> bytes:
    """A scatter plot: `cloud` (n, 2) as faint dots (or as the item itself when highlight is None)."""
    from PIL import Image, ImageDraw, ImageFont

    ss = 2  # supersampling: draw at 2x, then downsample for smooth dots
    S, margin_l, margin_b, pad = size * ss, 34 * ss, 22 * ss, 6 * ss
    im = Image.new("RGB", (S, S), (255, 255, 255))  # RGB + an "RGBA" draw: fills are alpha-blended
    draw = ImageDraw.Draw(im, "RGBA")
    font = ImageFont.load_default(size=11 * ss)
    cx, cy, half = bounds
    x0, x1, y0, y1 = margin_l, S - pad, pad, S - margin_b

    def to_px(p):
        return x0 + (p[:, 0] - (cx - half)) / (2 * half) * (x1 - x0), y1 - (p[:, 1] - (cy - half)) / (2 * half) * (y1 - y0)

    step = nice_step(2 * half)
    for axis in (0, 1):
        centre = (cx, cy)[axis]
        for k in range(math.ceil((centre - half) / step), math.floor((centre + half) / step) + 1):
            v = k * step
            label = f"{v:.3g}" if abs(v) > 1e-12 else "0"
            if axis == 0:
                px = x0 + (v - (cx - half)) / (2 * half) * (x1 - x0)
                draw.line([(px, y0), (px, y1)], fill=(148, 163, 184, 255) if k == 0 else (226, 232, 240, 255),
                          width=ss)
                draw.text((px, y1 + 4 * ss), label, fill=(100, 116, 139, 255), font=font, anchor="mt")
            else:
                py = y1 - (v - (cy - half)) / (2 * half) * (y1 - y0)
                draw.line([(x0, py), (x1, py)], fill=(148, 163, 184, 255) if k == 0 else (226, 232, 240, 255),
                          width=ss)
                draw.text((x0 - 4 * ss, py), label, fill=(100, 116, 139, 255), font=font, anchor="rm")
    draw.rectangle([x0, y0, x1, y1], outline=(203, 213, 225, 255), width=ss)
    px, py = to_px(cloud) if len(cloud) else (np.zeros(0), np.zeros(0))
    r, colour = (1.6 * ss, (100, 116, 139, 85)) if highlight is not None else (2.6 * ss, (37, 99, 235, 190))
    for a, b in zip(px, py):
        if x0 <= a <= x1 and y0 <= b <= y1:
            draw.ellipse([a - r, b - r, a + r, b + r], fill=colour)
    if highlight is not None:
        (a,), (b,) = to_px(highlight[None])
        a, b = min(max(a, x0), x1), min(max(b, y0), y1)  # a point outside the window sits on its edge
        for radius, fill in ((11 * ss, (220, 38, 38, 50)), (7 * ss, (255, 255, 255, 255)), (5.5 * ss, (220, 38, 38, 255))):
            draw.ellipse([a - radius, b - radius, a + radius, b + radius], fill=fill)
    return png_bytes(im.resize((size, size), Image.LANCZOS))


def render_message(text: str, size: int = 288) -> bytes:
    from PIL import Image, ImageDraw, ImageFont

    im = Image.new("RGB", (size, size), (248, 250, 252))
    ImageDraw.Draw(im).text((size / 2, size / 2), text, fill=(100, 116, 139), anchor="mm",
                            font=ImageFont.load_default(size=12))
    return png_bytes(im)


def png_bytes(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class Renderer:
    """Draws items; keeps, per task and condition, the point cloud and shared axes of its items
    (recomputed when the items of that group change)."""

    def __init__(self, store: PreferenceStore, max_cloud: int = 4000):
        self.store, self.max_cloud = store, max_cloud
        self._groups: dict = {}
        self._lock = threading.Lock()

    def group(self, meta: dict) -> tuple[np.ndarray, tuple]:
        members = self.store.items(task=meta["task"], condition=meta["condition"])
        key = (meta["task"], json.dumps(meta["condition"]))
        version = (len(members), members[-1]["id"] if members else 0)
        with self._lock:
            cached = self._groups.get(key)
        if cached and cached[0] == version:
            return cached[1], cached[2]
        ids = [m["id"] for m in members if item_kind(m["shape"]) == item_kind(meta["shape"])]
        if len(ids) > self.max_cloud:
            ids = random.Random(0).sample(ids, self.max_cloud)
        arrays = self.store.item_arrays(ids)
        points = np.concatenate([xy(a if a.ndim == 2 else a.reshape(1, -1)) for a in arrays] or [np.zeros((0, 2))])
        bounds = square_bounds(points)
        cloud = points if item_kind(meta["shape"]) == "point" else np.zeros((0, 2))
        with self._lock:
            self._groups[key] = (version, cloud, bounds)
        return cloud, bounds

    def png(self, item_id: int) -> bytes:
        meta = self.store.item(item_id)
        array = self.store.item_array(item_id)
        kind = item_kind(meta["shape"])
        if kind == "image":
            return render_image(array)
        if kind == "point":
            cloud, bounds = self.group(meta)
            return render_scatter(xy(array[None])[0], cloud, bounds)
        if kind == "points":
            _, bounds = self.group(meta)
            return render_scatter(None, xy(array), bounds)
        return render_message(f"cannot draw shape {tuple(array.shape)}")

    def describe(self, item_id: int) -> dict:
        meta = self.store.item(item_id)
        kind = item_kind(meta["shape"])
        return {"id": item_id, "kind": kind, "caption": caption(self.store.item_array(item_id), kind)}


# --- the app -----------------------------------------------------------------------------------------
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


class BodyLimit:
    """Refuse a request whose declared Content-Length is over the limit before reading it (413);
    bodies without one are counted as they are read (see read_json)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                    response = JSONResponse({"error": f"request body of {int(value)} bytes exceeds the limit of "
                                                      f"{self.limit} bytes"}, status_code=413)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


async def read_json(request: Request, limit: int) -> dict:
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HTTPException(400, f"malformed JSON: {getattr(err, 'msg', err)}") from None
    if not isinstance(data, dict):
        raise HTTPException(400, f"expected a JSON object, found {type(data).__name__}")
    return data


def create_app(store: PreferenceStore | str, *, question: str = QUESTION, max_body: int = MAX_BODY,
               seed: int | None = None) -> FastAPI:
    """The labeling app over one preference store (a PreferenceStore or the path of an existing one).
    `seed` fixes the random pairs and which item of a pair is shown on the left."""
    store = store if isinstance(store, PreferenceStore) else PreferenceStore(store)
    static = load_static()
    renderer = Renderer(store)
    rng = random.Random(seed)
    rng_lock = threading.Lock()
    app = FastAPI(title="scoreaction labeling", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError):
        return JSONResponse({"error": str(exc)}, status_code=503)

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = CSP
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    app.add_middleware(BodyLimit, limit=max_body)

    def labeler_of(request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, "missing token: send the header 'Authorization: Bearer <token>' "
                                     "(tokens come from `scoreaction feedback add-labeler`)",
                                headers={"WWW-Authenticate": "Bearer"})
        name = store.labeler_for_token(token.strip())
        if name is None:
            raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
        return name

    def pair_payload(left: int, right: int) -> dict:
        meta = store.item(left)
        condition = meta["condition"]
        prompt = (f"class {condition}" if isinstance(condition, int) else condition) if condition is not None else None
        return {"left": renderer.describe(left), "right": renderer.describe(right), "task": meta["task"],
                "condition": condition, "prompt": prompt}

    @app.get("/", include_in_schema=False)
    def index():
        body, media_type = static["index.html"]
        return Response(body, media_type=media_type)

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str):
        if name not in static:
            raise HTTPException(404, "not found")
        body, media_type = static[name]
        return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})

    @app.get("/api/next")
    def next_pair(request: Request):
        labeler = labeler_of(request)
        with rng_lock:
            pair_rng = random.Random(rng.getrandbits(64))
        pair = store.next_pair(labeler, rng=pair_rng)
        progress = store.progress(labeler)
        if pair is None:
            return {"done": True, "progress": progress, "question": question}
        left, right = pair if pair_rng.random() < 0.5 else pair[::-1]  # no side is favoured
        return {"done": False, **pair_payload(left, right), "progress": progress, "question": question}

    @app.post("/api/answer")
    async def answer(request: Request):
        labeler = await run_in_threadpool(labeler_of, request)
        data = await read_json(request, max_body)
        unknown = sorted(set(data) - ANSWER_FIELDS)
        if unknown:
            raise HTTPException(422, f"unknown field {unknown[0]!r}; expected {sorted(ANSWER_FIELDS)}")
        for name in ("left", "right"):
            if isinstance(data.get(name), bool) or not isinstance(data.get(name), int):
                raise HTTPException(422, f"{name} must be an item id (integer), found {data.get(name)!r}")
        if data.get("choice") not in CHOICES:
            raise HTTPException(422, f"choice must be one of {list(CHOICES)}, found {data.get('choice')!r}")
        try:
            cid = await run_in_threadpool(store.add_comparison, data["left"], data["right"], data["choice"], labeler,
                                          data.get("response_ms"), once=True)
        except AlreadyAnswered as err:
            raise HTTPException(409, str(err)) from None
        except StoreError:
            raise
        except ValueError as err:  # unknown item, a pair across tasks, a bad response_ms
            raise HTTPException(422, str(err)) from None
        return {"id": cid, "progress": await run_in_threadpool(store.progress, labeler)}

    @app.post("/api/undo")
    def undo(request: Request):
        labeler = labeler_of(request)
        removed = store.undo_last(labeler)
        payload = {"undone": None, "progress": store.progress(labeler)}
        if removed is not None:
            payload["undone"] = {k: removed[k] for k in ("left", "right", "choice")}
            payload.update(pair_payload(removed["left"], removed["right"]))
        return payload

    @app.get("/api/progress")
    def progress(request: Request):
        return store.progress(labeler_of(request))

    @app.get("/api/items/{name}")
    def item_png(name: str, request: Request):
        labeler_of(request)
        match = ITEM_ROUTE.match(name)
        if match is None:
            raise HTTPException(404, "not found: items are /api/items/<integer id>.png")
        try:
            body = renderer.png(int(match.group(1)))
        except UnknownItem as err:
            raise HTTPException(404, str(err)) from None
        return Response(body, media_type="image/png")

    return app
