"""The review page's web server: a thin Starlette layer over the library functions.

Every route calls :class:`~superdml.serve.decisions.Sorter`,
:mod:`~superdml.serve.tiles`, :mod:`~superdml.serve.similar` or
:class:`~superdml.serve.retrain.Retrain`, which the tests call directly too; the
routes only turn requests into calls and results into JSON. The page itself is static
(``static/``: HTML, JavaScript, the vendored Leaflet).
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from superdml.core.errors import SuperDMLError
from superdml.crops.folder import preview_file
from superdml.serve.decisions import Sorter
from superdml.serve.folder import ServedFolder
from superdml.serve.queue import SORTED
from superdml.serve.retrain import Retrain, review_round
from superdml.serve.security import TokenGuard, confined
from superdml.serve.similar import MosaicEmbeddings, embed_model, more_like
from superdml.serve.tiles import class_colors, image_tile, label_tile, max_zoom, outline, pixel_of

STATIC = Path(__file__).parent / "static"
PAGE = 60
"""Crops per grid page the page asks for by default."""


@dataclass
class Session:
    """Everything one server serves.

    Attributes
    ----------
    served : ServedFolder
    sorter : Sorter
    retrain : Retrain
    token : str
    device : str
        Where "more like this" and retraining run.
    epochs, workers : int or None
        Of the retrain pipeline (None: its defaults).
    checkpoint : Path or None
        The model of "more like this" (the label run's unless given).
    """

    served: ServedFolder
    sorter: Sorter
    retrain: Retrain
    token: str
    device: str = "auto"
    epochs: int | None = None
    workers: int | None = None
    checkpoint: Path | None = None
    mosaic: MosaicEmbeddings | None = None
    colors: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.colors = {
            e.name: "#{:02x}{:02x}{:02x}".format(*e.color) for e in self.served.scheme.entries
        }

    def switch(self, folder: Path) -> None:
        """Serve another crop folder (the next queue) into the same training folder."""
        from superdml.serve.folder import open_folder

        served = open_folder(folder, self.served.train_dir)
        sorter = Sorter(served.folder, served.queue, served.train_dir, served.classes)
        self.served, self.sorter, self.mosaic = served, sorter, None
        self.__post_init__()

    def item(self, i: int) -> dict[str, Any]:
        """Return the grid entry of crop `i`: where its image is, prediction, place on the map."""
        queue, served = self.served.queue, self.served
        location = self.sorter.location(i)
        if queue.state[i] == SORTED:
            src = "/files/train/" + location.relative_to(served.train_dir).as_posix()
        else:
            src = "/files/crops/" + str(queue.file[i])
        src = preview_file(src)  # a TIFF chip is shown by its preview PNG
        predicted = queue.predicted[i]
        score, margin = float(queue.score[i]), float(queue.margin[i])
        out = {
            "id": i, "file": str(queue.file[i]), "src": src, "predicted": predicted,
            "color": self.colors.get(str(predicted), "#808080"),
            "score": None if math.isnan(score) else round(score, 4),
            "margin": None if math.isnan(margin) else round(margin, 4),
            "raster": str(queue.raster[i]), "segment_id": int(queue.segment_id[i]),
        }  # fmt: skip
        run = served.runs.get(str(queue.raster[i]))
        if run is not None:
            out["row"], out["col"] = pixel_of(run, float(queue.x[i]), float(queue.y[i]))
        return out

    def page(self, start: int = 0, n: int = PAGE) -> dict[str, Any]:
        """Return a page of the queue and the counts."""
        ids = self.served.queue.pending(start, n)
        return {"items": [self.item(int(i)) for i in ids], "counts": self.served.queue.counts()}


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {}


def _error(err: Exception, status: int = 409) -> JSONResponse:
    return JSONResponse({"error": str(err)}, status_code=status)


def make_app(session: Session) -> Starlette:
    """Return the ASGI application of one review session (behind :class:`TokenGuard`)."""
    # long: the routes are closures over one review session, each a few lines that parse
    # a request and call the library functions of superdml.serve; one table reads best.

    def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    def info(request: Request) -> JSONResponse:
        out = session.served.describe()
        runs = session.served.runs.items()
        out["max_zoom"] = {name: max_zoom(r.source.height, r.source.width) for name, r in runs}
        out["similar"] = _checkpoint(session) is not None and bool(session.served.runs)
        return JSONResponse(out)

    def queue(request: Request) -> JSONResponse:
        start = int(request.query_params.get("start", 0))
        n = min(int(request.query_params.get("n", PAGE)), 1000)
        return JSONResponse(session.page(max(0, start), max(1, n)))

    async def decide(request: Request) -> JSONResponse:
        body = await _body(request)
        ids = [int(i) for i in body.get("ids", [])]
        op = request.path_params["op"]
        try:
            if op == "sort":
                cls, accept = str(body.get("class", "")), bool(body.get("accept"))
                records = await asyncio.to_thread(session.sorter.sort, ids, cls, accept)
            elif op == "skip":
                records = await asyncio.to_thread(session.sorter.skip, ids)
            else:
                undone = await asyncio.to_thread(session.sorter.undo)
                return JSONResponse({"undone": undone, **_next_page(body)})
        except SuperDMLError as err:
            return _error(err)
        return JSONResponse({"records": [r.to_json() for r in records], **_next_page(body)})

    def _next_page(body: dict[str, Any]) -> dict[str, Any]:
        """Return the counts, and the page of the queue the request names (one round trip)."""
        wanted = body.get("page")
        if not isinstance(wanted, dict) or "n" not in wanted:
            return {"counts": session.served.queue.counts()}
        page = session.page(
            max(0, int(wanted.get("start", 0))), min(max(1, int(wanted["n"])), 1000)
        )
        return {"counts": page["counts"], "page": page}

    def crop_file(request: Request) -> Response:
        roots = {"crops": session.served.folder, "train": session.served.train_dir}
        root = roots.get(request.path_params["root"])
        path = None if root is None else confined(root, request.path_params["path"])
        if path is None or path.suffix.lower() not in (".png", ".tif", ".tiff", ".jpg"):
            return Response("not found\n", status_code=404, media_type="text/plain")
        return FileResponse(path)

    def tile(request: Request) -> Response:
        p = request.path_params
        run = session.served.runs.get(p["raster"])
        if run is None:
            return Response(status_code=404)
        if p["layer"] == "labels":
            path = session.served.labels_raster(p["raster"])
            data = (
                None if path is None else label_tile(path, _label_colors(), p["z"], p["x"], p["y"])
            )
        else:
            bands = _bands(run)
            data = image_tile(run, bands, p["z"], p["x"], p["y"])
        if data is None:
            return Response(status_code=404)
        return Response(
            data, media_type="image/png", headers={"cache-control": "private, max-age=3600"}
        )

    colors: list[np.ndarray] = []

    def _label_colors() -> np.ndarray:
        if not colors:
            run = session.served.label_run
            scheme = run.scheme if run is not None else session.served.scheme
            colors.append(class_colors(scheme))
        return colors[0]

    def _bands(run: Any) -> list[int]:
        if session.served.rule is None:
            return list(range(min(3, len(run.bands))))
        from superdml.crops.cut import color_band_indexes

        return color_band_indexes(run, session.served.rule)

    def crop_outline(request: Request) -> JSONResponse:
        i = int(request.path_params["i"])
        item = session.item(i) if 0 <= i < len(session.served.queue) else {}
        run = session.served.runs.get(item.get("raster", ""))
        if run is None or "row" not in item:
            return JSONResponse({"rings": []})
        reach = 2 * (session.served.rule.crop_size if session.served.rule is not None else 64)
        rings = outline(run, item["segment_id"], item["row"], item["col"], reach)
        return JSONResponse({"rings": rings})

    def similar(request: Request) -> JSONResponse:
        i = int(request.path_params["i"])
        k = min(int(request.query_params.get("k", PAGE)), 1000)
        mosaic = _mosaic(session)
        if mosaic is None:
            return _error(RuntimeError("no model, or no segment run, to search"))
        mosaic.start()
        status = mosaic.progress()
        if not status["ready"] or not 0 <= i < len(session.served.queue):
            return JSONResponse(status)
        ids = more_like(mosaic, session.sorter, session.served.runs, i, k)
        return JSONResponse({**status, "items": [session.item(j) for j in ids]})

    async def retrain_start(request: Request) -> JSONResponse:
        previous, segments = session.served.previous_model(), session.served.segment_dir()
        if previous is None or segments is None:
            return _error(RuntimeError("no label run with a training folder to retrain from"))
        decided = session.sorter.decided()
        includes = {
            "last_seq": session.sorter.journal.next_seq - 1,
            "decisions": len(decided),
            "crops": [r.target for r in decided],
        }
        try:
            session.retrain.start(
                session.served.train_dir, includes, previous, segments, session.epochs,
                session.device, session.workers,
            )  # fmt: skip
        except (RuntimeError, OSError) as err:
            return _error(err)
        return JSONResponse(session.retrain.status())

    async def next_queue(request: Request) -> JSONResponse:
        status = session.retrain.status()
        segments = session.served.segment_dir()
        if status["state"] != "done" or segments is None:
            return _error(RuntimeError("no finished retrain round to review"))
        folder = session.retrain.workdir / f"round-{status['round']}" / "review"
        try:
            if not (folder / "crops.parquet").is_file():
                await asyncio.to_thread(
                    review_round, Path(status["labels"]), segments, folder,
                    session.served.folder, session.device,
                )  # fmt: skip
            await asyncio.to_thread(session.switch, folder)
        except (SuperDMLError, OSError) as err:
            return _error(err)
        return JSONResponse({"folder": str(folder), "counts": session.served.queue.counts()})

    def retrain_status(request: Request) -> JSONResponse:
        return JSONResponse(session.retrain.status())

    async def retrain_events(request: Request) -> StreamingResponse:
        async def stream() -> Any:
            seen = -1
            while not await request.is_disconnected():
                if session.retrain.version != seen:
                    seen = session.retrain.version
                    yield f"data: {json.dumps(session.retrain.status())}\n\n"
                await asyncio.sleep(0.25)

        return StreamingResponse(stream(), media_type="text/event-stream")

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/queue", queue),
        Route("/api/{op:str}", decide, methods=["POST"]),
        Route("/api/outline/{i:int}", crop_outline),
        Route("/api/similar/{i:int}", similar),
        Route("/api/retrain", retrain_status),
        Route("/api/retrain/start", retrain_start, methods=["POST"]),
        Route("/api/retrain/events", retrain_events),
        Route("/api/retrain/next", next_queue, methods=["POST"]),
        Route("/files/{root:str}/{path:path}", crop_file),
        Route("/map/{layer:str}/{raster:str}/{z:int}/{x:int}/{y:int}.png", tile),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    app = Starlette(routes=routes)
    return TokenGuard(app, session.token)  # type: ignore[return-value]


def _checkpoint(session: Session) -> Path | None:
    if session.checkpoint is not None:
        return session.checkpoint
    run = session.served.label_run
    if run is None or not Path(str(run.meta.get("checkpoint", ""))).is_file():
        return None
    return Path(str(run.meta["checkpoint"]))


def _mosaic(session: Session) -> MosaicEmbeddings | None:
    """Return the mosaic's embeddings (built on first use), None without a model or map."""
    served = session.served
    if session.mosaic is None:
        checkpoint = _checkpoint(session)
        if checkpoint is None or not served.runs:
            return None
        model = embed_model(checkpoint, served.label_run, session.device)
        session.mosaic = MosaicEmbeddings(
            list(served.runs.values()), model, served.label_run, served.train_dir
        )
    return session.mosaic
