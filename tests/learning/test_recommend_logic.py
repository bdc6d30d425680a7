"""Pure recommendation logic: session fold, filters, scoring, diversity, feedback labels, breaker."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from recstream.contracts.events import BehaviourEvent, RecommendationRequest, RequestFilters
from recstream.recommend.breaker import CircuitBreaker
from recstream.recommend.candidates import CandidateFilter, FilterColumns, build_filter
from recstream.recommend.feedback import PendingImpression
from recstream.recommend.lexical import lexical_score
from recstream.recommend.rerank import diversify
from recstream.recommend.scoring import Candidate, HeuristicRanker, RankContext
from recstream.recommend.session import HALF_LIFE_MS, MAX_RECENT, SessionState, apply_event


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=384).astype(np.float32)
    return v / np.linalg.norm(v)


def _stream(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    types = ["impression", "view", "click", "add_to_cart", "purchase"]
    return [
        {
            "offset": i,
            "event_type": rng.choice(types),
            "item_id": f"i{rng.randrange(40)}",
            "ts_ms": 1_000_000 + i * 7_000,
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def vectors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {f"i{k}": _unit(rng) for k in range(40)}


def _fold(events, vectors, state=None) -> SessionState:
    state = state or SessionState()
    for e in events:
        apply_event(state, **e, item_vec=vectors[e["item_id"]], item_category=f"c{int(e['item_id'][1:]) % 3}")
    return state


def test_replay_of_applied_offsets_changes_nothing(vectors) -> None:
    events = _stream(300)
    once = _fold(events, vectors)
    # At-least-once delivery: a crash replays a suffix (and even the whole stream) again.
    again = _fold(events[120:], vectors, SessionState.from_bytes(once.to_bytes()))
    again = _fold(events, vectors, again)
    assert again.to_bytes() == once.to_bytes()


def test_fold_is_independent_of_batching_and_storage_round_trips(vectors) -> None:
    events = _stream(500, seed=3)
    straight = _fold(events, vectors)
    state = SessionState()
    rng = random.Random(7)
    i = 0
    while i < len(events):  # random batch sizes, state stored and re-read between batches
        n = rng.randint(1, 60)
        state = SessionState.from_bytes(_fold(events[i : i + n], vectors, state).to_bytes())
        i += n
    assert state.to_bytes() == straight.to_bytes()


def test_counts_recent_seen_purchased(vectors) -> None:
    s = SessionState()
    seq = [("impression", "i1"), ("view", "i1"), ("click", "i1"), ("purchase", "i2"), ("view", "i3")]
    for off, (t, item) in enumerate(seq):
        apply_event(s, offset=off, event_type=t, item_id=item, ts_ms=1000 + off, item_vec=vectors[item])
    assert s.counts == {"impression": 1, "view": 2, "click": 1, "purchase": 1}
    assert s.recent == ["i1", "i2", "i3"]  # impressions are not interest; repeats collapse
    assert list(s.purchased) == ["i2"]
    assert set(s.seen) == {"i1", "i2", "i3"}
    for off in range(10, 10 + MAX_RECENT + 5):
        apply_event(s, offset=off, event_type="view", item_id=f"x{off}", ts_ms=2000 + off)
    assert len(s.recent) == MAX_RECENT and s.recent[-1] == f"x{9 + MAX_RECENT + 5}"


def test_embedding_moves_toward_clicked_items_and_decays(vectors) -> None:
    s = SessionState()
    apply_event(s, offset=0, event_type="click", item_id="i1", ts_ms=0, item_vec=vectors["i1"], item_category="a")
    apply_event(
        s,
        offset=1,
        event_type="click",
        item_id="i2",
        ts_ms=HALF_LIFE_MS * 10,
        item_vec=vectors["i2"],
        item_category="b",
    )
    emb = s.embedding()
    assert emb is not None and abs(np.linalg.norm(emb) - 1) < 1e-3
    assert emb @ vectors["i2"] > 0.99  # ten half-lives later, the old click barely counts
    assert s.affinity_share()["b"] > 0.99
    assert s.emb is not None and s.emb.dtype == np.float16 and len(s.to_bytes()) < 1400


def test_build_filter_excludes_purchases_always_and_seen_for_recommend() -> None:
    s = SessionState(seen=dict.fromkeys(["a", "b"]), purchased=dict.fromkeys(["b"]))
    rec = build_filter(RecommendationRequest(user_id="u", filters=RequestFilters(exclude_items=["z"])), s)
    assert rec.exclude_ids == {"a", "b", "z"}
    search = build_filter(RecommendationRequest(kind="search", user_id="u", query="x"), s)
    assert search.exclude_ids == {"b"}
    f = CandidateFilter(categories=("Drama",), max_price=10.0)
    assert f.allows("x", {"category": "Drama", "price": 5.0, "in_stock": True})
    assert not f.allows("x", {"category": "Drama", "price": 50.0, "in_stock": True})
    assert not f.allows("x", {"category": "Drama", "price": 5.0, "in_stock": False})
    assert not f.allows("x", {"category": "Comedy", "price": 5.0, "in_stock": True})


_CATEGORIES = st.sampled_from(["Drama", "Comedy", "Horror", None])


@given(
    payloads=st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "category": _CATEGORIES,
                "price": st.one_of(st.none(), st.floats(0, 100, allow_nan=False)),
                "in_stock": st.booleans(),
            },
        ),
        min_size=1,
        max_size=12,
    ),
    in_stock_only=st.booleans(),
    categories=st.one_of(st.none(), st.lists(_CATEGORIES.filter(bool), max_size=2).map(tuple)),
    exclude_categories=st.lists(_CATEGORIES.filter(bool), max_size=2).map(tuple),
    max_price=st.one_of(st.none(), st.floats(0, 100, allow_nan=False)),
    exclude=st.sets(st.integers(0, 14), max_size=4),
)
def test_the_filter_over_a_snapshot_is_the_filter_item_by_item(
    payloads, in_stock_only, categories, exclude_categories, max_price, exclude
) -> None:
    """The vectorised form (BM25's cut over a whole snapshot) and `allows` (the re-check of what
    the store returns) are one rule: they agree on every payload, missing fields included."""
    ids = [f"i{n}" for n in range(len(payloads))]
    f = CandidateFilter(
        in_stock_only=in_stock_only,
        exclude_ids=frozenset(f"i{n}" for n in exclude),  # some beyond the snapshot
        categories=categories,
        exclude_categories=exclude_categories,
        max_price=max_price,
    )
    got = f.allows_rows(FilterColumns.of(ids, payloads))
    assert got.tolist() == [f.allows(i, p) for i, p in zip(ids, payloads, strict=True)]


def test_diversify_caps_a_category_dedups_and_fills_when_short() -> None:
    cands = [Candidate(f"h{i}", 1.0 - i * 0.01, category="Horror") for i in range(10)]
    cands += [Candidate("c1", 0.5, category="Comedy"), Candidate("c2", 0.4, category="Comedy")]
    cands += [Candidate("h0", 0.99, category="Horror")]
    scores = [c.retrieval_score for c in cands]
    picked = diversify(cands, scores, k=5)
    ids = [c.item_id for c, _ in picked]
    assert len(ids) == len(set(ids)) == 5
    assert sum(c.category == "Horror" for c, _ in picked) == 3 and {"c1", "c2"} <= set(ids)  # cap ceil(.6*5)
    only_horror = diversify(cands[:4], scores[:4], k=4)
    assert len(only_horror) == 4  # cap lifted rather than returning a short list


def test_heuristic_ranker_prefers_session_direction_and_explains(vectors) -> None:
    cands = [Candidate(k, 0.0, vectors[k], "c") for k in ("i1", "i2", "i3")]
    ctx = RankContext(session_vec=vectors["i2"], affinity={"c": 1.0})
    r = HeuristicRanker()
    scores = r.score(ctx, cands)
    assert int(np.argmax(scores)) == 1
    reasons = r.reasons(ctx, cands)
    assert set(reasons[1]) == {"session", "category"}


def test_feedback_labels_and_example() -> None:
    ev = BehaviourEvent(type="impression", user_id="u", item_id="i", request_id="r1", position=2, propensity=0.5)
    p = PendingImpression.from_event(ev, now_ms=0, window_ms=1000, partition=3, context_items=["a", "b"])
    assert p is not None and p.deadline_ms == 1000
    assert p.to_example().label == 0.0
    assert p.record("click") and not p.record("view")
    p = PendingImpression.from_bytes(p.to_bytes())
    assert p.record("purchase")
    ex = p.to_example()
    assert (ex.clicked, ex.purchased, ex.label, ex.position, ex.propensity) == (True, True, 1.0, 2, 0.5)
    assert ex.context_items == ["a", "b"]
    no_request = BehaviourEvent(type="impression", user_id="u", item_id="i")
    assert PendingImpression.from_event(no_request, now_ms=0, window_ms=1, partition=0, context_items=[]) is None


def test_a_search_impression_carries_its_query_into_the_example() -> None:
    ev = BehaviourEvent(type="impression", user_id="u", item_id="i", request_id="r1", position=0, propensity=1.0)
    p = PendingImpression.from_event(ev, now_ms=0, window_ms=1, partition=0, context_items=[], query="star wars")
    assert p is not None and PendingImpression.from_bytes(p.to_bytes()).to_example().query == "star wars"
    old = json.loads(p.to_bytes())  # a window opened before queries were kept (changelog replay)
    del old["query"]
    assert PendingImpression.from_bytes(json.dumps(old).encode()).to_example().query is None


def test_search_queries_are_kept_for_a_while_and_bounded() -> None:
    from recstream.recommend.feedback import SearchQueries

    now = [0.0]
    queries = SearchQueries(ttl_s=60.0, capacity=2, clock=lambda: now[0])
    queries.remember("a", "star wars")
    assert queries.get("a") == "star wars" and queries.get("a") == "star wars"  # one per impression
    assert queries.get("unknown") is None
    now[0] = 30.0
    queries.remember("b", "horror")
    queries.remember("c", "comedy")  # over capacity: the oldest goes
    assert queries.get("a") is None and len(queries) == 2
    now[0] = 95.0  # b and c are 65 s old
    assert queries.get("b") is None
    queries.remember("d", "drama")  # drops the expired ones
    assert len(queries) == 1 and queries.get("d") == "drama"
    with pytest.raises(ValueError):
        SearchQueries(ttl_s=0)


def test_lexical_and_breaker() -> None:
    assert lexical_score("star wars", {"title": "Star Wars (1977)"}) == 1.0
    assert lexical_score("star trek", {"title": "Star Wars (1977)"}) == 0.5
    now = [0.0]
    b = CircuitBreaker(threshold=2, cooldown_s=1.0, clock=lambda: now[0])
    b.failure()
    assert b.allow()
    b.failure()
    assert not b.allow()
    now[0] = 1.5
    assert not b.refusing()
    assert b.allow()  # the probe
    assert b.refusing() and not b.allow()  # one probe per cooldown, not everyone at once
    b.failure()  # the probe failed: open for another cooldown
    now[0] = 2.0
    assert not b.allow()
    now[0] = 2.6
    assert b.allow()
    b.success()
    assert b.failures == 0 and b.allow() and b.allow()


def test_items_nobody_interacted_with_keep_their_retrieval_slot():
    """The quality bench's cold-item rule at serving: the ranker reorders the others around them."""
    from recstream.recommend.rerank import new_item_order, place_new_items

    # retrieval order a, b(new), c, d(new), e; the ranker prefers e > c > a
    scores = np.array([1.0, -5.0, 2.0, 9.0, 3.0])
    new = [False, True, False, True, False]
    out = place_new_items(scores, new)
    order = np.argsort(-out, kind="stable")
    assert order.tolist() == [4, 1, 2, 3, 0]  # slots 1 and 3 keep b and d
    assert order.tolist() == new_item_order(scores, new).tolist()
    assert sorted(out.tolist()) == sorted(scores.tolist())
    # no new item: the ranker's order; only new items: retrieval's
    assert new_item_order(scores, [False] * 5).tolist() == [3, 4, 2, 0, 1]
    assert new_item_order(scores, [True] * 5).tolist() == [0, 1, 2, 3, 4]


def test_a_slot_factor_below_one_moves_new_items_up():
    """NEW_ITEM_SLOT_FACTOR: a new item at retrieval slot s goes to slot s * factor."""
    from recstream.recommend.rerank import new_item_order

    scores = np.arange(10, 0, -1, dtype=float)  # the ranker agrees with retrieval
    new = [False] * 10
    new[8] = True
    assert new_item_order(scores, new, 0.5).tolist().index(8) == 4
    assert new_item_order(scores, new, 0.0).tolist().index(8) == 0
    assert new_item_order(scores, new, 1.0).tolist().index(8) == 8
    with pytest.raises(ValueError, match="slot_factor"):
        new_item_order(scores, new, 1.5)


@given(
    scores=st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=30),
    data=st.data(),
    factor=st.floats(0.0, 1.0),
)
def test_new_item_order_is_a_permutation_that_keeps_known_items_in_ranker_order(scores, data, factor):
    from recstream.recommend.rerank import new_item_order

    new = data.draw(st.lists(st.booleans(), min_size=len(scores), max_size=len(scores)))
    order = new_item_order(scores, new, factor).tolist()
    assert sorted(order) == list(range(len(scores)))
    known = [i for i in order if not new[i]]
    assert [scores[i] for i in known] == sorted((scores[i] for i in known), reverse=True)
    fresh = [i for i in order if new[i]]
    assert fresh == sorted(fresh)  # new items keep their retrieval order among themselves
    for i in fresh:  # and never land below their retrieval slot
        assert order.index(i) <= i


def test_an_item_vector_of_another_width_starts_the_session_vector_over() -> None:
    """After the catalogue is re-embedded by an encoder of another width, a user's next event must
    fold (the session vector restarts in the new space), not raise with the state half-changed."""
    from recstream.recommend.session import SessionState, apply_event

    state = SessionState()
    assert apply_event(state, offset=1, event_type="click", item_id="a", ts_ms=1_000, item_vec=np.ones(384))
    assert apply_event(state, offset=2, event_type="click", item_id="b", ts_ms=2_000, item_vec=np.full(256, 2.0))
    assert state.emb is not None and state.emb.shape == (256,) and state.last_offset == 2
    assert state.recent == ["a", "b"]
    np.testing.assert_allclose(state.emb.astype(np.float32) / state.emb[0], np.ones(256))
