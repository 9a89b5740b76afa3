"""Write the demo data shipped in `nikl_ray/demo_data/` (NIKL emotion format).

The rows are composed by this script from phrases written for it (nothing is copied from the
licensed NIKL corpus): a target, a context and one or two emotion phrases. They are learnable
but not trivially so: phrases overlap across emotions, and some rows have no target.

    python scripts/make_demo_data.py          # rewrites nikl_ray/demo_data/{train,test}.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PHRASES = {
    "joy": ["너무 행복해", "진짜 좋다", "기분 최고야", "웃음이 절로 나와", "신난다 ㅎㅎ", "좋아서 날아갈 것 같아"],
    "anticipation": ["빨리 보고 싶다", "벌써 기대된다", "다음 주가 기다려져", "얼른 나왔으면", "두근두근해", "언제 오나 기다리는 중"],
    "trust": ["믿고 본다", "역시 믿음직해", "항상 든든해", "믿을 수 있어", "의지가 된다", "이번에도 믿어볼게"],
    "surprise": ["깜짝 놀랐어", "이게 실화야?", "세상에 말도 안 돼", "헐 대박", "예상 못 했어", "갑자기 이게 뭐야"],
    "disgust": ["정말 역겹다", "보기 싫어", "토 나올 것 같아", "진짜 별로야 질린다", "혐오스러워", "더러워서 못 보겠다"],
    "fear": ["너무 무서워", "겁이 난다", "소름 돋아서 잠을 못 자", "불안해 죽겠어", "떨려서 못 보겠어", "무서워서 혼자 못 있겠어"],
    "anger": ["진짜 화난다", "열받아", "어이가 없네 짜증나", "분노가 치민다", "용서 못 해", "화가 나서 참을 수가 없다"],
    "sadness": ["너무 슬프다", "눈물이 난다", "마음이 아파", "우울해", "보고 싶어서 울었어", "허전하고 쓸쓸하다"],
}
# Roughly the corpus's skew: joy and anticipation dominate.
WEIGHTS = {"joy": 30, "anticipation": 16, "trust": 8, "surprise": 8, "disgust": 8, "fear": 6, "anger": 8, "sadness": 10}
TARGETS = ["이 영화", "새 앨범", "우리 팀", "오늘 경기", "그 배우", "신제품", "&name1&", "이번 공연", "주말 여행", "새 드라마",
           "엄마 생일", "동생", "회사 일", "시험 결과", "첫 콘서트"]
CONTEXTS = ["{t} 보고 {p}", "{t} 소식 듣고 {p} &others&", "솔직히 {t} {p}", "오늘 {t} 생각하면 {p}", "{t} 얘기만 나오면 {p}",
            "아 {t} 진짜... {p}"]
NO_TARGET_CONTEXTS = ["그냥 오늘은 {p}", "하루 종일 {p} &others&", "{p} 정말로"]


def make_row(rng: random.Random, rid: str, labelled: bool) -> dict:
    emotions = list(PHRASES)
    first = rng.choices(emotions, weights=[WEIGHTS[e] for e in emotions])[0]
    chosen = [first]
    if rng.random() < 0.12:
        chosen.append(rng.choice([e for e in emotions if e != first]))
    phrase = " ".join(rng.choice(PHRASES[e]) for e in chosen)
    if rng.random() < 0.1:
        text = rng.choice(NO_TARGET_CONTEXTS).format(p=phrase)
        target = {"form": None, "begin": None, "end": None}
    else:
        t = rng.choice(TARGETS)
        text = rng.choice(CONTEXTS).format(t=t, p=phrase)
        begin = text.index(t)
        target = {"form": t, "begin": begin, "end": begin + len(t)}
    row = {"id": rid, "input": {"form": text, "target": target}}
    if labelled:
        row["output"] = {e: str(e in chosen) for e in emotions}
    return row


def main(out_dir: Path = Path(__file__).resolve().parents[1] / "nikl_ray" / "demo_data") -> None:
    rng = random.Random(2023)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, n, labelled in (("train", 400, True), ("test", 100, False)):
        rows = [make_row(rng, f"demo-ea-{split}-{i:06d}", labelled) for i in range(1, n + 1)]
        (out_dir / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {n} rows to {out_dir / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
