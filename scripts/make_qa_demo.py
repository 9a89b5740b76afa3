"""Write the question-answering demo data shipped in `nikl_ray/demo_data/` (JSON Lines QA format).

The items are composed by this script from facts written for it about a made-up home-repair and
interior domain (nothing is copied from the licensed Hansol Deco QA data): 30 topics (15 defects,
15 materials) × 5 facts each, one item per (topic, fact). A train item has two phrasings of its
question, two or three reference answers that share the fact's key phrase (so answers are
learnable) and a `category`; a test item has one phrasing and nothing else, as the competition's
test file has it. Seeded: every run writes the same files.

    python scripts/make_qa_demo.py      # rewrites nikl_ray/demo_data/qa_{train,test}.jsonl

Read them with `TaskSpec(name="qa-demo", kind="generate", format="jsonl", group_field="category")`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20240
N_TEST = 30

# (name, category, facts). Defects: 정의, 원인, 해결, 예방, 방치; materials: 정의, 장점, 단점, 관리, 수명.
DEFECTS = [
    ("벽지 들뜸", "마감하자", [
        "벽지가 벽면에서 떨어져 부풀어 오르는 현상",
        "풀칠 부족과 높은 실내 습도",
        "들뜬 곳에 주사기로 풀을 넣고 롤러로 눌러 붙이는 방법",
        "충분한 풀칠과 시공 후 환기",
        "벽지가 찢어지거나 주변까지 떨어질",
    ]),
    ("곰팡이", "기타", [
        "습한 벽면이나 모서리에 검은 얼룩으로 번지는 균류",
        "환기 부족과 결로로 생긴 습기",
        "제거제로 닦고 완전히 말린 뒤 방습 처리하는 방법",
        "자주 환기하고 습도를 60% 이하로 유지하는 것",
        "호흡기 질환을 일으키고 마감재가 썩을",
    ]),
    ("결로", "건축구조", [
        "차가운 벽이나 창에 수증기가 물방울로 맺히는 현상",
        "실내외 온도 차와 부족한 단열",
        "단열재를 보강하고 환기를 늘리는 방법",
        "적정 실내 온도 유지와 하루 두세 번의 환기",
        "곰팡이가 생기고 벽지가 얼룩질",
    ]),
    ("벽 균열", "건축구조", [
        "벽체나 마감면에 금이 가는 현상",
        "콘크리트의 건조 수축과 구조 변형",
        "균열 보수재를 채우고 표면을 다시 마감하는 방법",
        "충분한 양생 기간과 이음부 보강",
        "물이 스며들고 균열이 더 커질",
    ]),
    ("타일 들뜸", "마감하자", [
        "타일이 바탕면에서 떨어져 두드리면 빈 소리가 나는 하자",
        "접착제 부족과 바탕면의 먼지",
        "들뜬 타일을 떼어 내고 접착제를 다시 발라 붙이는 방법",
        "바탕면 청소와 고른 접착제 도포",
        "타일이 깨지거나 떨어져 다칠",
    ]),
    ("누수", "건축구조", [
        "배관이나 방수층의 틈으로 물이 새는 하자",
        "방수층 손상과 배관 이음부 노후",
        "새는 곳을 찾아 방수층이나 배관을 교체하는 방법",
        "정기적인 배관 점검과 방수층 보수",
        "아랫집까지 물이 새고 구조체가 상할",
    ]),
    ("벽지 이음매 벌어짐", "마감하자", [
        "벽지끼리 만나는 부분이 벌어져 틈이 보이는 하자",
        "벽지의 건조 수축과 부족한 겹침",
        "이음매에 풀을 다시 바르고 눌러 맞추는 방법",
        "충분한 겹침 시공과 급격한 건조 방지",
        "틈이 넓어지고 벽지 끝이 말려 올라갈",
    ]),
    ("마루 들뜸", "마감하자", [
        "마루판이 바닥에서 떨어져 솟아오르는 하자",
        "바닥 습기와 신축 여유 부족",
        "마루판을 걷어 내고 습기를 말린 뒤 다시 까는 방법",
        "바닥 습기 측정과 벽 쪽 신축 여유 확보",
        "걸을 때 소리가 나고 마루판이 갈라질",
    ]),
    ("페인트 박리", "마감하자", [
        "칠한 도막이 바탕면에서 벗겨지는 현상",
        "바탕면의 습기와 부족한 하도 처리",
        "벗겨진 도막을 긁어 내고 하도부터 다시 칠하는 방법",
        "바탕면 건조와 프라이머 도포",
        "벗겨짐이 번지고 벽면이 지저분해질",
    ]),
    ("실리콘 변색", "마감하자", [
        "욕실이나 주방의 실리콘이 검게 변하는 현상",
        "물기와 비누 찌꺼기에 번식한 곰팡이",
        "기존 실리콘을 걷어 내고 항균 실리콘으로 다시 쏘는 방법",
        "사용 후 물기 제거와 환기",
        "틈으로 물이 스며 누수가 생길",
    ]),
    ("문틀 뒤틀림", "기타", [
        "문틀이 휘어 문이 잘 닫히지 않는 하자",
        "목재의 함수율 변화와 고정 불량",
        "경첩을 조정하거나 문틀을 다시 고정하는 방법",
        "건조된 목재 사용과 단단한 고정",
        "문이 끼이고 틈으로 바람이 들어올",
    ]),
    ("줄눈 탈락", "마감하자", [
        "타일 사이를 채운 줄눈이 부서져 빠지는 하자",
        "줄눈재 배합 불량과 잦은 물기",
        "낡은 줄눈을 파내고 새 줄눈재로 채우는 방법",
        "정확한 배합과 충분한 양생",
        "물이 스며 타일이 들뜰",
    ]),
    ("창호 외풍", "건축구조", [
        "닫힌 창틈으로 바깥바람이 새어 들어오는 현상",
        "창호 틈새와 낡은 기밀재",
        "문풍지나 기밀재를 새로 붙이는 방법",
        "기밀재의 정기 교체",
        "난방비가 늘고 결로가 생길",
    ]),
    ("천장 얼룩", "마감하자", [
        "천장 마감면에 누런 물자국이 생기는 하자",
        "윗집 누수나 배관 결로",
        "누수를 고친 뒤 얼룩진 마감재를 교체하는 방법",
        "윗집 배관과 방수 상태 점검",
        "천장재가 처지고 곰팡이가 번질",
    ]),
    ("몰딩 틈", "마감하자", [
        "몰딩과 벽 또는 천장 사이가 벌어지는 하자",
        "몰딩 고정 불량과 건물 수축",
        "틈을 실리콘이나 퍼티로 메우고 칠하는 방법",
        "충분한 고정과 이음부 접착",
        "틈에 먼지가 쌓이고 벌어짐이 커질",
    ]),
]
MATERIALS = [
    ("실크벽지", "마감재", [
        "종이 위에 PVC 층을 입혀 질감을 낸 벽지",
        "습기에 강하고 오염을 닦기 쉬운 점",
        "값이 비싸고 통기성이 낮은 점",
        "물걸레로 가볍게 닦아 내는 방법",
        "10년 안팎",
    ]),
    ("합지벽지", "마감재", [
        "종이를 두 겹 이상 붙여 만든 벽지",
        "값이 싸고 통기성이 좋은 점",
        "오염과 습기에 약한 점",
        "마른 천으로 먼지를 털어 내는 방법",
        "5~7년",
    ]),
    ("강마루", "마감재", [
        "합판 위에 고압 라미네이트를 입힌 마루",
        "긁힘에 강하고 관리가 쉬운 점",
        "촉감이 딱딱하고 소리가 울리는 점",
        "꽉 짠 물걸레로 닦는 방법",
        "15~20년",
    ]),
    ("강화마루", "마감재", [
        "섬유판 위에 필름을 입혀 끼워 까는 마루",
        "시공이 빠르고 값이 싼 점",
        "습기에 약하고 걸을 때 소리가 나는 점",
        "마른걸레와 청소기로 먼지를 없애는 방법",
        "10~15년",
    ]),
    ("원목마루", "마감재", [
        "천연 나무를 켜서 만든 마루",
        "나뭇결이 자연스럽고 촉감이 따뜻한 점",
        "값이 비싸고 긁힘과 습기에 약한 점",
        "전용 왁스로 주기적으로 코팅하는 방법",
        "20년 이상",
    ]),
    ("포세린 타일", "마감재", [
        "고온에서 구워 흡수율이 매우 낮은 자기질 타일",
        "단단하고 물을 거의 먹지 않는 점",
        "무겁고 자르기 어려운 점",
        "중성세제로 닦고 줄눈을 점검하는 방법",
        "20~30년",
    ]),
    ("데코타일", "마감재", [
        "PVC로 만든 얇은 조각형 바닥재",
        "값이 싸고 부분 교체가 쉬운 점",
        "이음매가 보이고 눌림 자국이 생기는 점",
        "중성세제를 푼 물걸레로 닦는 방법",
        "7~10년",
    ]),
    ("장판", "마감재", [
        "두루마리로 바닥 전체에 까는 PVC 바닥재",
        "이음매가 적고 물에 강한 점",
        "무거운 가구에 눌린 자국이 남는 점",
        "물걸레 청소와 가구 밑 받침을 쓰는 방법",
        "10년 안팎",
    ]),
    ("수성페인트", "마감재", [
        "물로 희석해 쓰는 냄새가 적은 페인트",
        "냄새가 적고 빨리 마르는 점",
        "물기가 많은 곳에서 쉽게 상하는 점",
        "부드러운 스펀지로 가볍게 닦는 방법",
        "5~7년",
    ]),
    ("규조토", "마감재", [
        "규조류 화석 흙으로 만든 벽 마감재",
        "습도를 조절하고 냄새를 흡수하는 점",
        "충격에 약하고 부스러지기 쉬운 점",
        "마른 솔로 먼지를 털어 내는 방법",
        "10~15년",
    ]),
    ("대리석", "마감재", [
        "석회암이 변성되어 생긴 무늬가 고운 천연석",
        "고급스럽고 무늬가 아름다운 점",
        "산에 약하고 얼룩이 잘 스며드는 점",
        "중성세제로 닦고 코팅제를 바르는 방법",
        "30년 이상",
    ]),
    ("아트월", "인테리어", [
        "거실 벽 한 면을 타일이나 석재로 꾸민 장식 벽",
        "공간에 포인트를 주는 점",
        "시공비가 높고 교체가 어려운 점",
        "마른 천으로 먼지를 닦아 내는 방법",
        "15년 안팎",
    ]),
    ("간접조명", "인테리어", [
        "빛을 벽이나 천장에 비추어 은은하게 밝히는 조명",
        "눈부심이 적고 분위기가 아늑한 점",
        "시공이 까다롭고 밝기가 부족한 점",
        "조명 홈의 먼지를 주기적으로 닦는 방법",
        "LED로 5만 시간",
    ]),
    ("붙박이장", "인테리어", [
        "벽에 맞춰 짜 넣은 고정식 수납장",
        "자투리 공간 없이 수납을 늘리는 점",
        "옮길 수 없고 뒤쪽에 습기가 차기 쉬운 점",
        "문을 자주 열어 환기하는 방법",
        "15~20년",
    ]),
    ("롤스크린", "인테리어", [
        "천을 말아 올리고 내려 빛을 가리는 가림막",
        "깔끔하고 빛 조절이 쉬운 점",
        "먼지가 쌓이고 천이 구겨지기 쉬운 점",
        "먼지떨이나 청소기로 표면을 청소하는 방법",
        "5~10년",
    ]),
]

# Per fact: question phrasings and answer templates; {x} is the topic, {f} the fact; {x은}, {f을} etc. are
# the word with its particle (은/는, 이/가, 을/를, 으로/로, 이란/란, 이라고/라고), chosen by its last syllable.
DEFECT_FACTS = [
    (["{x이} 뭐야?", "{x이란} 무엇인가요?", "{x이} 무슨 뜻인지 알려줘"],
     ["{x은} {f}입니다.", "{f을} {x이라고} 합니다.", "{x이란} {f을} 말합니다."]),
    (["{x은} 왜 생기나요?", "{x}의 원인이 뭐야?", "{x이} 생기는 이유는?"],
     ["{x}의 주된 원인은 {f}입니다.", "{x은} 주로 {f} 때문에 생깁니다.", "대개 {f이} {x}의 원인입니다."]),
    (["{x은} 어떻게 고치나요?", "{x이} 생기면 어떻게 해야 해?", "{x} 보수 방법이 궁금해요"],
     ["{x은} {f으로} 고칩니다.", "{f이} 가장 좋은 해결책입니다.", "{x이} 생기면 {f을} 권합니다."]),
    (["{x을} 예방하려면 어떻게 해야 하나요?", "{x을} 막는 방법은?", "{x이} 안 생기게 하려면?"],
     ["{x을} 예방하려면 {f이} 중요합니다.", "{f에} 신경 쓰면 {x을} 막을 수 있습니다.",
      "{x} 예방의 핵심은 {f}입니다."]),
    (["{x을} 방치하면 어떻게 되나요?", "{x을} 그냥 두면 문제가 있어?", "{x을} 놔두면 안 되나요?"],
     ["{x을} 방치하면 {f} 수 있습니다.", "그냥 두면 {f} 수 있어 빨리 보수하는 것이 좋습니다.",
      "{x을} 놔두면 {f} 수 있으니 일찍 고치세요."]),
]
MATERIAL_FACTS = [
    DEFECT_FACTS[0],
    (["{x}의 장점은 뭐야?", "{x을} 쓰면 좋은 점이 있나요?", "{x}의 좋은 점을 알려줘"],
     ["{x}의 장점은 {f}입니다.", "{x은} {f이} 좋습니다.", "{f이} {x}의 장점으로 꼽힙니다."]),
    (["{x}의 단점은 무엇인가요?", "{x을} 쓸 때 아쉬운 점은?", "{x}에 단점이 있어?"],
     ["{x}의 단점은 {f}입니다.", "{f이} {x}의 아쉬운 점입니다.", "{x은} {f이} 단점입니다."]),
    (["{x은} 어떻게 관리하나요?", "{x} 관리 방법 알려줘", "{x을} 오래 쓰려면 어떻게 관리해?"],
     ["{x은} {f으로} 관리합니다.", "{f이} {x}에 맞는 관리법입니다.", "{x} 관리에는 {f이} 좋습니다."]),
    (["{x}의 수명은 얼마나 되나요?", "{x은} 몇 년 정도 쓸 수 있어?", "{x}의 교체 주기는?"],
     ["{x은} 보통 {f} 정도 씁니다.", "{x}의 일반적인 수명은 {f}입니다.", "대개 {f} 쓰면 {x을} 바꿉니다."]),
]

PARTICLES = {"은": ("은", "는"), "이": ("이", "가"), "을": ("을", "를"), "으로": ("으로", "로"),
             "이란": ("이란", "란"), "이라고": ("이라고", "라고"), "에": ("에", "에")}


def _final(word: str) -> int | None:
    """The final consonant index of a word's last Hangul syllable (0: none); digits read in Korean."""
    last = word.rstrip()[-1]
    if "가" <= last <= "힣":
        return (ord(last) - 0xAC00) % 28
    return {"0": 1, "1": 8, "2": 0, "3": 1, "4": 0, "5": 0, "6": 1, "7": 8, "8": 8, "9": 0, "%": 0}.get(last, 0)


def _with(word: str, particle: str) -> str:
    with_batchim, without = PARTICLES[particle]
    final = _final(word)
    if particle == "으로":
        return word + ("으로" if final and final != 8 else "로")  # ㄹ takes 로
    return word + (with_batchim if final else without)


def fill(template: str, x: str, f: str) -> str:
    out, i = [], 0
    while i < len(template):
        if template[i] != "{":
            out.append(template[i])
            i += 1
            continue
        j = template.index("}", i)
        slot = template[i + 1:j]
        word, particle = (x, slot[1:]) if slot[0] == "x" else (f, slot[1:])
        out.append(_with(word, particle) if particle else word)
        i = j + 1
    return "".join(out)


def make_items(rng: random.Random) -> list[dict]:
    items = []
    for topics, facts in ((DEFECTS, DEFECT_FACTS), (MATERIALS, MATERIAL_FACTS)):
        for name, category, values in topics:
            for (questions, answers), value in zip(facts, values):
                qs = rng.sample(questions, 2)
                refs = rng.sample(answers, rng.choice([2, 3]))
                items.append({"question": [fill(q, name, value) for q in qs],
                              "answers": [fill(a, name, value) for a in refs], "category": category})
    return items


def main(out_dir: Path | None = None) -> None:
    out_dir = out_dir or Path(__file__).resolve().parents[1] / "nikl_ray" / "demo_data"
    rng = random.Random(SEED)
    items = make_items(rng)
    rng.shuffle(items)
    train, test = items[N_TEST:], items[:N_TEST]
    lines = [{"id": f"TRAIN_{i:03d}", **item} for i, item in enumerate(train)]
    test_lines = [{"id": f"TEST_{i:03d}", "question": item["question"][0]} for i, item in enumerate(test)]
    for name, rows in (("qa_train.jsonl", lines), ("qa_test.jsonl", test_lines)):
        path = out_dir / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} items, {path.stat().st_size / 1024:.1f} KB")


if __name__ == "__main__":
    main()
