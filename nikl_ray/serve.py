"""A finished run on Ray Serve: `POST /predict` (or, for a generate run, `POST /generate`), `GET /health`,
on 127.0.0.1 unless configured.

    nikl-ray serve --results results/nikl --local               # http://127.0.0.1:8000
    curl -s 127.0.0.1:8000/predict -H 'Content-Type: application/json' -d '{"text": "오늘 영화 너무 좋다", "target": "영화"}'
    ray job submit --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/serve.py --results results/nikl

One deployment holds the whole run (fold models, the TF-IDF member, heads, rule) through the
Predictor: a row needs exactly one fold model per member and the members are small next to a
replica's overhead, so one replica answers a row end to end, with no network hop per member;
`--replicas N` adds copies. With `--student FORM` the run's distilled student answers alone
(fp32, int8 or ONNX; `nikl-ray distill`), in the same request and response format (each answer
says `"student": FORM`). Rows from concurrent requests are batched with Serve's own
`@serve.batch` and answered in one Predictor call. A body is one row `{"text", "target"?,
"explain"?}` or a list of them; the answer gives per row its labels, per-label probabilities and
the rule (and word highlights with `"explain": true`). A generate (QA) run answers `POST
/generate` with a body `{"question", "context"?, "candidate"?}` or a list of them: per question
the answer, the member it came from and every member's candidates. A bad request gets a 4xx
with the reason; the replica keeps serving. With `--chain KEYWORD_RESULTS SENTIMENT_RESULTS` a
keyword run and a sentiment run answer as one (nikl_ray/chain.py): `POST /predict` with
`{"text", "explain"?}` gives each predicted keyword of a review with its sentiment. A replica
loads and runs every model it serves before it reports ready (Predictor.warm_up): `/health`
answers only then, and the first request costs what the next ones do.
"""

import logging
from pathlib import Path

from fastapi import Body, FastAPI, HTTPException
from pydantic import BaseModel, Field
from ray import serve

log = logging.getLogger(__name__)
MAX_CHARS = 2000
MAX_ROWS = 256
BATCH = 32  # rows per Predictor call, and so the requests a replica takes in at once (Serve wants them to agree)

app = FastAPI(title="nikl-ray")


class Question(BaseModel):
    question: str = Field(description="The question to answer.")
    context: str | None = Field(None, description="A passage to answer from (tasks with a context field).")
    candidate: str | None = Field(None, description="Which candidate answers (default: the submitted one).")


class Row(BaseModel):
    text: str = Field(description="The sentence to label.")
    target: str | None = Field(None, description="The span the emotion is about (must occur in the text).")
    explain: bool = Field(False, description="Also return each word's effect on the predicted labels.")


def check_text(text: str) -> None:
    """A row's or review's text a replica can read (defined before the deployments: Serve pickles a
    deployment's class, with the functions it calls, where it is declared)."""
    if not text.strip():
        raise HTTPException(400, "text is empty")
    if len(text) > MAX_CHARS:
        raise HTTPException(413, f"text has {len(text)} characters; at most {MAX_CHARS}")


@serve.deployment(name="nikl-ray", max_ongoing_requests=BATCH)
@serve.ingress(app)
class RunDeployment:
    def __init__(self, results: str, student: str | None = None):
        from nikl_ray.predictor import Predictor

        self.predictor = Predictor.load(results, student=student)
        self.student = student
        self.needs_spans = self.predictor.task.target_field is not None
        self.generates = self.predictor.task.generates
        self.warm_up_seconds = self.predictor.warm_up()
        if not self.generates:  # the highlights' code path too
            from nikl_ray.explain import explain

            explain(self.predictor, "warm up", "warm" if self.needs_spans else None)
        log.info("replica ready: %s warmed up in %.1f s", results, self.warm_up_seconds)

    @app.get("/health")
    def health(self) -> dict:
        p = self.predictor
        return {"status": "ok", "ready": True, "warm_up_seconds": round(self.warm_up_seconds, 2), "task": p.task.name,
                "kind": p.task.kind, "labels": p.task.labels, "candidate": p.candidate, "rule": p.rule, "student": self.student}

    @app.post("/generate")
    async def generate(self, body: Question | list[Question] = Body(...)) -> dict | list[dict]:
        from nikl_ray.predictor import BadRequest

        if not self.generates:
            raise HTTPException(400, f"task {self.predictor.task.name} classifies: POST /predict")
        questions = body if isinstance(body, list) else [body]
        if not questions or len(questions) > MAX_ROWS:
            raise HTTPException(400, f"send 1 to {MAX_ROWS} questions")
        for q in questions:
            if not q.question.strip():
                raise HTTPException(400, "question is empty")
            if len(q.question) + len(q.context or "") > MAX_CHARS:
                raise HTTPException(413, f"question and context have more than {MAX_CHARS} characters")
        answers = []
        try:
            for q in questions:  # one call per question: each may ask for its own candidate
                answers += self.predictor.generate([q.question], [q.context], candidate=q.candidate)
        except BadRequest as e:
            raise HTTPException(400, str(e)) from None
        return answers if isinstance(body, list) else answers[0]

    def _check(self, row: Row) -> None:
        check_text(row.text)
        if row.target is not None:
            if not self.needs_spans:
                raise HTTPException(400, f"task {self.predictor.task.name} has no target spans")
            if not row.target or row.target not in row.text:
                raise HTTPException(400, f"target {row.target!r} does not occur in the text")

    @serve.batch(max_batch_size=BATCH, max_concurrent_batches=1, batch_wait_timeout_s=0.01)
    async def _answer(self, rows: list[Row]) -> list[dict]:
        p = self.predictor
        return p.answer(p.rows_of([r.text for r in rows], [r.target for r in rows]))

    @app.post("/predict")
    async def predict(self, body: Row | list[Row] = Body(...)) -> dict | list[dict]:
        import asyncio

        from nikl_ray.explain import explain

        if self.generates:
            raise HTTPException(400, f"task {self.predictor.task.name} generates answers: POST /generate "
                                     '{"question": …}')
        rows = body if isinstance(body, list) else [body]
        if not rows or len(rows) > MAX_ROWS:
            raise HTTPException(400, f"send 1 to {MAX_ROWS} rows")
        for row in rows:
            self._check(row)
        answers = await asyncio.gather(*(self._answer(r) for r in rows))
        for row, answer in zip(rows, answers):
            if row.explain:
                answer["explanation"] = explain(self.predictor, row.text, row.target).to_dict()
        return answers if isinstance(body, list) else answers[0]


chain_app = FastAPI(title="nikl-ray chain")


class Review(BaseModel):
    text: str = Field(description="The review.")
    explain: bool = Field(False, description="Also return the words behind each keyword and each sentiment.")


@serve.deployment(name="nikl-ray-chain", max_ongoing_requests=BATCH)
@serve.ingress(chain_app)
class ChainDeployment:
    """A keyword run and a sentiment run as one endpoint (nikl_ray/chain.py): `POST /predict` with
    `{"text", "explain"?}` (or a list) answers each predicted keyword with its sentiment."""

    def __init__(self, keyword_results: str, sentiment_results: str, student: str | None = None):
        from nikl_ray.chain import Chain

        self.chain = Chain.load(keyword_results, sentiment_results, student=student)
        self.warm_up_seconds = self.chain.warm_up()
        log.info("replica ready: the chain %s → %s warmed up in %.1f s", keyword_results, sentiment_results,
                 self.warm_up_seconds)

    @chain_app.get("/health")
    def health(self) -> dict:
        return {"status": "ok", "ready": True, "warm_up_seconds": round(self.warm_up_seconds, 2), **self.chain.describe()}

    @serve.batch(max_batch_size=BATCH, max_concurrent_batches=1, batch_wait_timeout_s=0.01)
    async def _answer(self, reviews: list[Review]) -> list[dict]:
        return self.chain.answer([r.text for r in reviews], explain=[r.explain for r in reviews])

    @chain_app.post("/predict")
    async def predict(self, body: Review | list[Review] = Body(...)) -> dict | list[dict]:
        import asyncio

        reviews = body if isinstance(body, list) else [body]
        if not reviews or len(reviews) > MAX_ROWS:
            raise HTTPException(400, f"send 1 to {MAX_ROWS} reviews")
        for review in reviews:
            check_text(review.text)
        answers = await asyncio.gather(*(self._answer(r) for r in reviews))
        return answers if isinstance(body, list) else answers[0]


def deploy(results: str | Path | None = None, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
           student: str | None = None, chain: tuple[str | Path, str | Path] | None = None) -> str:
    """Start Serve's HTTP proxy on host:port and deploy the finished run in `results` (answered by its
    distilled student in form `student`: fp32, int8 or onnx, when given), or the `chain` of a keyword
    run and a sentiment run; returns its URL."""
    serve.start(http_options={"host": host, "port": port})
    if chain:
        app_ = ChainDeployment.options(num_replicas=replicas).bind(*(str(Path(r).resolve()) for r in chain), student)
    else:
        app_ = RunDeployment.options(num_replicas=replicas).bind(str(Path(results).resolve()), student)
    serve.run(app_, name="nikl-ray", route_prefix="/")
    return f"http://{host}:{port}"


def serve_run(results: str | Path | None = None, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
              student: str | None = None, chain: tuple[str | Path, str | Path] | None = None,
              block: bool = False) -> str:
    """Deploy the finished run in `results` (or the `chain`) on the connected Ray and say where; with
    `block`, serve until Ctrl-C (a local Ray instance lives only as long as the process that started it)."""
    import time

    url = deploy(results, host=host, port=port, replicas=replicas, student=student, chain=chain)
    from nikl_ray.artifacts import read_json
    from nikl_ray.layout import Layout

    generates = not chain and read_json(Layout(results).record)["task"].get("kind") == "generate"
    route, example = ("generate", '{"question": "도배지가 들뜨는 이유는?"}') if generates else (
        "predict", '{"text": "배송은 빠른데 가격이 너무 비싸요", "explain": true}' if chain else
        '{"text": "오늘 영화 너무 좋다", "explain": true}')
    what = " → ".join(str(Path(r).resolve()) for r in chain) if chain else str(Path(results).resolve())
    who = f" (distilled students, {student})" if student else ""
    print(f"serving {what}{who} at {url}  (GET {url}/health, POST {url}/{route})")
    print(f"""  curl -s {url}/{route} -H 'Content-Type: application/json' -d '{example}'""")
    if block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return url
