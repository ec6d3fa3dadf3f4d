"""Reference ids of the real aidreams260K llama2.c model (../shared/data/aidreams260K).

../shared/data/README.md section (c) lists the first 20 ids of greedy decoding from BOS; the full 60
are pinned from haf_jax's conversion and cross-checked in tests/unit/test_llama2c.py by an
independent NumPy float64 forward on the raw llama2.c arrays.
"""

import re

README_IDS = [1, 319, 459, 355, 260, 275, 429, 339, 315, 374, 327, 446, 262, 421, 392, 275, 280, 269, 440, 270]
GREEDY_60 = README_IDS + [
    283,
    446,
    299,
    303,
    266,
    358,
    430,
    312,
    379,
    441,
    260,
    446,
    262,
    421,
    392,
    275,
    280,
    269,
    440,
    270,
    283,
    446,
    299,
    303,
    384,
    467,
    407,
    360,
    266,
    291,
    443,
    435,
    295,
    448,
    429,
    465,
    265,
    434,
    317,
    431,
]


def readme_greedy_ids(shared_data) -> list[int]:
    """The ids listed in ../shared/data/README.md section (c) (the first 20 of the greedy run)."""
    text = (shared_data / "README.md").read_text()
    m = re.search(r"greedy from BOS \(id 1\).*?gives ids\s*\[([\d,\s]+)", text, re.S)
    assert m, "../shared/data/README.md no longer lists the aidreams260K greedy ids"
    ids = [int(x) for x in m.group(1).split(",") if x.strip()]
    assert len(ids) == 20, ids
    return ids
