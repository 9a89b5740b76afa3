"""The demo's product reviews: keywords, and a sentiment per keyword (what `serve --chain` composes).

    python -m nikl_ray.demo_reviews        # rewrites nikl_ray/demo_data/reviews_*.jsonl (seeded: the same files)

Each review names one to three aspects (delivery, price, quality, design, size), each praised or
criticised in a phrase that may or may not contain the keyword itself ("배송이 빨라요", "하루 만에
왔어요"). Two files of the same reviews:

- `reviews_keywords.jsonl`: `{id, text, keywords: [...]}` — the keyword run (multi-label);
- `reviews_sentiment.jsonl`: `{id, text, keyword, sentiment}` — one row per (review, keyword) pair,
  the sentiment run (single-label); `keyword` is a plain string, located in the text where it
  occurs (data.first_span), as a served chain locates a predicted keyword.

Their tasks and runs: nikl_ray/examples/review_keywords.yaml and review_sentiment.yaml.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

KEYWORDS = ["배송", "가격", "품질", "디자인", "사이즈"]
SENTIMENTS = ["negative", "positive"]
PHRASES = {
    "배송": {"positive": ["배송이 정말 빨라요", "배송 빠르고 포장도 꼼꼼해요", "하루 만에 도착했어요", "주문 다음 날 바로 왔어요"],
             "negative": ["배송이 너무 느려요", "배송이 일주일이나 걸렸어요", "택배가 늦게 와서 답답했어요", "상자가 찌그러져서 왔어요"]},
    "가격": {"positive": ["가격이 저렴해요", "이 가격에 이 정도면 훌륭해요", "가성비 최고예요", "할인받아서 싸게 샀어요"],
             "negative": ["가격이 너무 비싸요", "가격 대비 별로예요", "돈이 아까워요", "이 돈 주고 사기엔 아깝네요"]},
    "품질": {"positive": ["품질이 좋아요", "품질이 기대 이상이에요", "마감이 꼼꼼하고 튼튼해요", "오래 써도 멀쩡해요"],
             "negative": ["품질이 별로예요", "품질이 실망스러워요", "금방 고장 났어요", "실밥이 다 풀려 있었어요"]},
    "디자인": {"positive": ["디자인이 예뻐요", "디자인이 세련됐어요", "색감이 마음에 들어요", "보기만 해도 예뻐요"],
             "negative": ["디자인이 촌스러워요", "디자인이 사진과 달라요", "색이 화면이랑 너무 달라요", "모양이 투박해요"]},
    "사이즈": {"positive": ["사이즈가 딱 맞아요", "사이즈가 정확해요", "치수가 표기대로예요", "입어 보니 잘 맞아요"],
             "negative": ["사이즈가 너무 작아요", "사이즈가 생각보다 커요", "한 치수 작게 나왔어요", "입어 보니 헐렁해요"]},
}
OPENERS = ["", "", "전반적으로 ", "솔직히 ", "두 번째 구매인데 ", "선물용으로 샀는데 "]
JOINS = [". ", ", ", " 그리고 ", " 근데 "]
CLOSERS = ["", "", ".", "!", " 재구매 의사 있어요.", " 참고하세요."]

def reviews(n: int, seed: int = 0) -> list[dict]:
    """n reviews: {id, text, aspects: {keyword: sentiment}}."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        aspects = rng.sample(KEYWORDS, rng.choice([1, 1, 2, 2, 3]))
        said = {k: rng.choice(SENTIMENTS) for k in aspects}
        parts = [rng.choice(PHRASES[k][s]) for k, s in said.items()]
        text = rng.choice(OPENERS) + parts[0]
        for part in parts[1:]:
            text += rng.choice(JOINS) + part
        out.append({"id": f"review-{i:04d}", "text": text + rng.choice(CLOSERS), "aspects": said})
    return out


def write(out_dir: Path, n: int = 300, seed: int = 0) -> list[Path]:
    rows = reviews(n, seed)
    keywords = out_dir / "reviews_keywords.jsonl"
    sentiment = out_dir / "reviews_sentiment.jsonl"
    with open(keywords, "w", encoding="utf-8") as kf, open(sentiment, "w", encoding="utf-8") as sf:
        for r in rows:
            kf.write(json.dumps({"id": r["id"], "text": r["text"], "keywords": list(r["aspects"])}, ensure_ascii=False) + "\n")
            for k, s in r["aspects"].items():
                sf.write(json.dumps({"id": f"{r['id']}-{KEYWORDS.index(k)}", "text": r["text"], "keyword": k,
                                     "sentiment": s}, ensure_ascii=False) + "\n")
    return [keywords, sentiment]


if __name__ == "__main__":
    for path in write(Path(__file__).parent / "demo_data"):
        print(path)
