"""Search: the HEM/TEM protocol's cases, BM25 and fusion, and the LoRA query encoder as it is served."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from recstream.data.datasets import InteractionData, tiny_synthetic
from recstream.data.split import leave_last_out
from recstream.models.encoder import TextEncoder
from recstream.search.protocol import (
    category_cases,
    category_query_of_items,
    clean_title,
    known_item_cases,
    training_pairs,
)
from recstream.search.query_encoder import QueryEncoderConfig, save_adapter, train_query_encoder
from recstream.search.scoring import BM25Index, fuse, reciprocal_rank_fusion, standardise


def _genre_data() -> InteractionData:
    items = pd.DataFrame(
        {
            "item_id": ["a", "b", "c", "d"],
            "title": ["Toy Story (1995)", "Heat (1995)", "Casino (1995)", "Nothing Here"],
            "category": ["Animation", "Action", "Drama", "unknown"],
            "genres": ["Animation Children's Comedy Comedy", "Action Crime Thriller", "Drama Crime", "unknown"],
        }
    )
    rows = []
    for u in range(4):
        for t, item in enumerate(["a", "b", "c", "d", "a", "b"][u : u + 3]):
            rows.append((f"u{u}", item, 100 * u + t, "click", np.nan))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "event", "rating"])
    return InteractionData(interactions=inter, items=items, name="genres")


def test_category_query_is_the_target_items_genres_without_unknown_or_repeats():
    split = leave_last_out(_genre_data())
    queries = dict(zip(split.item_ids, category_query_of_items(split), strict=True))
    assert queries == {"a": "animation children's comedy", "b": "action crime thriller", "c": "drama crime", "d": ""}


def test_category_cases_take_the_held_out_target_and_drop_targets_without_words():
    split = leave_last_out(_genre_data())
    cases = category_cases(split, "test")
    queries = category_query_of_items(split)
    plain = split.cases("test")
    assert cases.notes["cases"] == len(plain)
    assert len(cases) + cases.notes["without_category_words"] == len(plain)
    history_of = dict(zip(plain.users.tolist(), plain.histories, strict=True))
    for q, t, u, h in zip(cases.queries, cases.targets, cases.users, cases.histories, strict=True):
        assert q == queries[t] and q
        assert (h == history_of[u]).all()  # the context is the user's whole earlier history
    assert all(queries[t] == "" for t in set(plain.targets.tolist()) - set(cases.targets.tolist()))


def test_known_item_queries_are_one_edit_away_from_a_unique_title():
    split = leave_last_out(tiny_synthetic(n_users=20, n_items=30))
    split.data.items["title"] = [f"The Quick Brown Fox number{i} (1999)" for i in range(len(split.data.items))]
    cases = known_item_cases(split, n=25, seed=3)
    assert cases.synthetic and len(cases) == 25 and (cases.users == -1).all()
    titles = split.data.items.set_index("item_id").loc[split.item_ids, "title"].map(clean_title).tolist()
    for q, t in zip(cases.queries, cases.targets, strict=True):
        words, orig = q.split(), titles[t].split()
        assert q != titles[t]
        if len(words) == len(orig) - 1:  # one word dropped, order kept
            assert any(words == orig[:n] + orig[n + 1 :] for n in range(len(orig)))
        else:  # one adjacent swap inside one word
            diff = [(a, b) for a, b in zip(words, orig, strict=True) if a != b]
            assert len(diff) == 1 and sorted(diff[0][0]) == sorted(diff[0][1]) and diff[0][0][0] == diff[0][1][0]
    again = known_item_cases(split, n=25, seed=3)
    assert again.queries == cases.queries and (again.targets == cases.targets).all()


def test_training_pairs_come_from_training_interactions_and_titles_only():
    split = leave_last_out(_genre_data())
    pairs = training_pairs(split)
    queries = category_query_of_items(split)
    by_query = dict(zip(pairs.queries, range(len(pairs)), strict=True))
    train_counts = np.bincount(split.train["item_idx"], minlength=split.n_items)
    for item, q in enumerate(queries):
        if q:
            assert pairs.labels[by_query[q], item] == train_counts[item]
    assert set(np.asarray(pairs.queries)[pairs.is_title]) == {"Toy Story", "Heat", "Casino", "Nothing Here"}
    held_out = pd.concat([split.valid, split.test])
    total_category = pairs.labels[~pairs.is_title].sum()
    assert total_category == sum(train_counts[i] for i, q in enumerate(queries) if q)
    assert len(held_out)  # the held-out interactions exist and are not counted above


def test_bm25_prefers_rare_matching_words_and_ignores_unknown_ones():
    index = BM25Index(["red apple", "red car", "green apple pie", "blue sky"])
    s = index.scores(["apple", "red pie", "zebra", ""])
    assert s[0, 0] > 0 and s[0, 2] > 0 and s[0, 1] == 0 and s[0, 3] == 0
    assert s[1].argmax() == 2  # 'pie' is rarer than 'red'
    assert (s[2] == 0).all() and (s[3] == 0).all()
    # a catalogue whose texts hold no indexable word (stop words, one letter) scores 0, never raises
    assert (BM25Index(["the a", "of", "x"]).scores(["the x"]) == 0).all()


def test_fusion_standardises_each_signal_and_rrf_matches_its_definition():
    a = np.array([[3.0, 1.0, 2.0], [5.0, 5.0, 5.0]])
    b = np.array([[0.0, 10.0, 5.0], [1.0, 2.0, 3.0]])
    assert np.allclose(standardise(a)[1], 0.0)
    assert np.allclose(fuse([(1.0, a), (0.0, b)]), standardise(a))
    assert np.allclose(fuse([(1.0, 100 * a), (2.0, b + 7)]), standardise(a) + 2 * standardise(b))
    rrf = reciprocal_rank_fusion([a[:1], b[:1]], k=60)
    expected = [1 / 61 + 1 / 63, 1 / 63 + 1 / 61, 1 / 62 + 1 / 62]
    assert np.allclose(rrf[0], expected)
    with pytest.raises(ValueError):
        fuse([(0.0, a)])


@pytest.mark.slow
def test_query_encoder_learns_what_a_query_is_answered_with_and_serves_the_same_vectors(tmp_path):
    """Queries whose text says nothing about their answers ("pick one" -> item 3) are learned
    from pairs alone; the adapter loaded by TextEncoder (what Triton runs) gives the same vectors."""
    texts = [f"item number {i} about {w}" for i, w in enumerate(["cats", "dogs", "boats", "trains", "music", "paint"])]
    items = TextEncoder().encode(texts)
    from scipy import sparse

    from recstream.search.protocol import SearchCases, TrainingPairs

    queries = ["pick one", "pick two", "choose a thing", *texts]
    answers = [3, 5, 0, *range(len(texts))]
    labels = sparse.csr_matrix((np.ones(len(queries)), (np.arange(len(queries)), answers)), shape=(9, 6))
    pairs = TrainingPairs(queries=queries, labels=labels, is_title=np.array([False] * 3 + [True] * 6))
    valid = SearchCases(
        kind="category",
        queries=queries[:3],
        users=np.zeros(3, np.int64),
        histories=[np.zeros(0, np.int64)] * 3,
        targets=np.array(answers[:3]),
    )
    cfg = QueryEncoderConfig(epochs=8, steps_per_epoch=10, batch_size=12, patience=8, lr=3e-3, seed=0)
    tower, stats = train_query_encoder(pairs, items, [valid], cfg)
    assert stats["valid_ndcg10_untrained"] < 0.9
    learned = tower.encode(queries[:3]) @ items.T
    assert (learned.argmax(axis=1) == answers[:3]).all()
    served = TextEncoder(adapter_dir=save_adapter(tower, tmp_path / "adapter"), max_seq_length=16)
    assert np.allclose(served.encode(queries[:3]), tower.encode(queries[:3]), atol=1e-5)
    # the base is named, not located: a shipped version carried one machine's venv path
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    int8 = TextEncoder(adapter_dir=tmp_path / "adapter", max_seq_length=16, precision="int8")
    cos = (int8.encode(queries[:3]) * served.encode(queries[:3])).sum(axis=1)
    assert (cos > 0.8).all()  # int8 moves vectors a little; what it costs is measured by bench-search
    assert ((int8.encode(queries[:3]) @ items.T).argmax(axis=1) == answers[:3]).all()


def test_served_hybrid_search_computes_the_offline_fused_score_from_catalogue_moments():
    """What the worker computes per candidate equals bench-search's fuse over the whole catalogue."""
    from recstream.search.served import HybridSearch, SearchWeights

    rng = np.random.default_rng(0)
    n, d = 40, 16
    vectors = rng.normal(size=(n, d))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    colours, things = rng.choice(["red", "blue", "green"], n), rng.choice(["car", "hat"], n)
    texts = [f"item {w} {v}" for w, v in zip(colours, things, strict=True)]
    popularity = rng.integers(0, 50, n).astype(float)
    weights = SearchWeights(lexical=0.7, popularity=0.3, session=1.5)
    search = HybridSearch([f"i{k}" for k in range(n)], vectors, texts, popularity, weights)
    q, s = vectors[3] + 0.1 * rng.normal(size=d), vectors[7]
    lexical = search.lexical("red car")
    offline = fuse(
        [
            (1.0, (vectors @ q)[None]),
            (0.7, BM25Index(texts).scores(["red car"])),
            (0.3, np.log1p(popularity)[None]),
            (1.5, (vectors @ s)[None]),
        ]
    )[0]
    picked = [5, 0, 39, 12]
    scored = search.score(q, s, lexical, [f"i{k}" for k in picked], vectors[picked], popularity[picked])
    assert np.allclose(scored.scores, offline[picked], atol=1e-4)
    assert set(scored.reasons[0]) == {"dense", "lexical", "popularity", "session"}
    assert np.isclose(sum(scored.reasons[1].values()), scored.scores[1], atol=1e-3)
    # one vector search with the retrieval vector orders items by the dense + session terms
    w = search.retrieval_vector(q, s)
    dense_session = fuse([(1.0, (vectors @ q)[None]), (1.5, (vectors @ s)[None])])[0]
    assert (np.argsort(-(vectors @ w))[:10] == np.argsort(-dense_session)[:10]).all()
    empty = search.score(q, s, lexical, [], np.zeros((0, d)), np.zeros(0))  # filters that match nothing
    assert empty.scores.shape == (0,) and empty.reasons == []
    assert search.lexical_top(lexical, 3) and all(
        "red" in texts[int(i[1:])] or "car" in texts[int(i[1:])] for i in search.lexical_top(lexical, 3)
    )


def test_the_lexical_half_takes_bm25s_best_among_the_items_the_filter_allows():
    """60 romances say "love" and one horror film does, ranked 61st by BM25: a search for "love"
    in Horror must still get it from the lexical half (it was cut before the filter ran)."""
    from recstream.recommend.candidates import CandidateFilter
    from recstream.search.served import HybridSearch, SearchWeights

    texts = [f"Love Love story number {n}" for n in range(60)] + ["Love at First Bite, a long tale of night"]
    payloads = [{"category": "Romance", "price": 5.0, "in_stock": True}] * 60
    payloads = [*payloads, {"category": "Horror", "price": 5.0, "in_stock": True}]
    ids = [f"i{n}" for n in range(len(texts))]
    vectors = np.eye(len(texts), 8, dtype=np.float32) + 0.01
    search = HybridSearch(ids, vectors, texts, np.zeros(len(texts)), SearchWeights(lexical=1.0), payloads)
    lexical = search.lexical("love")
    assert "i60" not in search.lexical_top(lexical, 50)  # the cut without the filter
    assert search.lexical_top(lexical, 50, CandidateFilter(categories=("Horror",))) == ["i60"]
    romances = search.lexical_top(lexical, 5, CandidateFilter(exclude_ids=frozenset({"i0", "i1"})))
    assert len(romances) == 5 and not {"i0", "i1"} & set(romances)
    with pytest.raises(ValueError, match="payloads"):
        HybridSearch(ids, vectors, texts, np.zeros(len(texts)), SearchWeights(lexical=1.0)).lexical_top(
            lexical, 5, CandidateFilter()
        )


def test_search_weights_travel_in_the_text_encoder_config(tmp_path):
    from recstream.models.export import set_config_param
    from recstream.search.served import SearchWeights

    config = tmp_path / "config.pbtxt"
    config.write_text('name: "text_encoder"\nparameters: {\n  key: "precision"\n  value: { string_value: "fp32" }\n}\n')
    set_config_param(config, "search_weights", SearchWeights(lexical=1.0, session=0.5).model_dump_json())
    set_config_param(config, "search_weights", SearchWeights(lexical=2.0).model_dump_json())
    text = config.read_text()
    assert text.count("search_weights") == 1 and 'string_value: "fp32"' in text
    raw = text.split('key: "search_weights"')[1].split('string_value: "')[1].rsplit('" }', 1)[0]
    as_triton_returns = {"parameters": {"search_weights": {"string_value": raw.replace('\\"', '"')}}}
    assert SearchWeights.from_model_config(as_triton_returns) == SearchWeights(lexical=2.0)
    assert SearchWeights.from_model_config({}) is None


@pytest.mark.slow
def test_continual_query_round_learns_from_search_clicks_and_the_gate_refuses_noise():
    """Live search clicks continue training the live adapter; the gate (held-back newest clicks,
    MRR not below live's) promotes a round that learned and refuses one trained on noise."""
    from recstream.search.continual import QueryUpdateConfig, SearchClick, update_query_encoder

    texts = [f"item number {i} about {w}" for i, w in enumerate(["cats", "dogs", "boats", "trains", "music", "paint"])]
    ids = [f"i{i}" for i in range(len(texts))]
    items = TextEncoder().encode(texts)
    live = TextEncoder().encode
    cfg = QueryUpdateConfig(min_clicks=50, min_holdout=10, steps=40, lr=3e-3, batch_size=16)
    answers = {"pick one": "i3", "pick two": "i5", "choose a thing": "i0"}
    clicks = [SearchClick(q, answers[q], ts) for ts, q in enumerate(list(answers) * 30)]
    learned = update_query_encoder(None, live, clicks, ids, items, cfg)
    assert learned is not None and learned.decision.accepted, learned.decision
    assert learned.decision.candidate["mrr"] > learned.decision.live["mrr"] + 0.2
    assert learned.held_out == 18 and learned.trained_on == 72

    rng = np.random.default_rng(0)
    noise = [SearchClick(texts[n % 6], ids[int(rng.integers(6))], n) for n in range(80)]
    truth = [SearchClick(texts[n % 6], ids[n % 6], 100 + n) for n in range(20)]  # newest: held back
    refused = update_query_encoder(None, live, noise + truth, ids, items, cfg)
    assert refused is not None and not refused.decision.accepted, refused.decision
    assert refused.decision.live["mrr"] > 0.9  # the live encoder already answers these titles
    assert update_query_encoder(None, live, clicks[:10], ids, items, cfg) is None  # too few clicks


def test_the_worker_follows_the_search_weights_of_a_new_text_encoder_version(tmp_path):
    """A new text_encoder version brings its own weights, or none (a rollback to zero-shot): the
    worker's hybrid search follows what the embedder read with the version change."""
    from types import SimpleNamespace

    from recstream.config import Settings
    from recstream.search.served import SearchWeights
    from streams.context import StreamContext
    from streams.hybrid_search import LiveHybridSearch
    from streams.inference import UNKNOWN

    ctx = StreamContext(settings=Settings(run_dir=tmp_path), worker="w", agents=())
    embedder = SimpleNamespace(weights_seen=UNKNOWN, version="text_encoder-v2", search_weights=lambda: None)
    ctx._embedder = embedder
    ctx._hybrid_search = LiveHybridSearch(ctx, SearchWeights(lexical=1.0), "text_encoder-v2")
    ctx._follow_search_weights()  # nothing read yet: unchanged
    assert ctx._hybrid_search.weights == SearchWeights(lexical=1.0)
    embedder.weights_seen, embedder.version = SearchWeights(lexical=2.0, session=1.0), "text_encoder-v3"
    ctx._follow_search_weights()
    assert ctx._hybrid_search.weights == SearchWeights(lexical=2.0, session=1.0)
    assert ctx._hybrid_search.version == "text_encoder-v3"
    embedder.weights_seen, embedder.version = None, "text_encoder-v1"
    assert ctx.hybrid_search is None  # rolled back to an encoder without weights: searches use the ranker


def test_a_failed_snapshot_build_is_retried_after_the_retry_delay(monkeypatch):
    """A build that raises keeps the previous snapshot and is tried again RETRY_S later; it must
    not count as built (it was then left for REFRESH_S, serving deleted items' text meanwhile)."""
    from types import SimpleNamespace

    import streams.hybrid_search as hs
    from recstream.search.served import SearchWeights

    item = lambda i: SimpleNamespace(item_id=i, vector=np.ones(4, np.float32), payload={"title": i})  # noqa: E731
    store = SimpleNamespace(revision=1, items=[item("a"), item("b")])
    store.snapshot = lambda: store.items
    clock = [1000.0]
    monkeypatch.setattr(hs.time, "monotonic", lambda: clock[0])
    live = hs.LiveHybridSearch(SimpleNamespace(store=store, tables={}), SearchWeights(lexical=1.0), "v")
    first = live.current()
    assert first is not None and first.item_ids == ["a", "b"]
    real = hs.HybridSearch
    monkeypatch.setattr(hs, "HybridSearch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    store.revision, store.items = 2, [item("a")]  # "b" deleted
    clock[0] += hs.MIN_REBUILD_GAP_S + 1
    assert live.current() is first  # the failed build keeps the previous snapshot
    monkeypatch.setattr(hs, "HybridSearch", real)
    clock[0] += hs.RETRY_S + 1  # well before REFRESH_S
    assert live.current().item_ids == ["a"]
