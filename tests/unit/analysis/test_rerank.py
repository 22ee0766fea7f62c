"""Re-ranking (dba, aqe, krr): each method against a direct float64 implementation written here from
the papers' definitions, the spec parser's errors, and `gpl neighbors --rerank` end to end."""

from __future__ import annotations

import json
import math
import shutil

import h5py
import numpy as np
import pytest
from conftest import SAMPLE_IMAGES, Page, embed_to, run_gpl

from gpl_cli.analysis import neighbors as nb, rerank as rr
from gpl_cli.errors import GplError

# --- independent references (float64, loops and sets) ------------------------------------------


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ranked(sims, skip=None):
    """Indices by similarity, highest first, ties to the lower index; `skip` left out."""
    return [j for j in sorted(range(len(sims)), key=lambda j: (-sims[j], j)) if j != skip]


def ref_dba(db, k, alpha):
    db = unit(db)
    out = []
    for i, x in enumerate(db):
        sims = db @ x
        total = x.copy()
        for j in ranked(sims, skip=i)[:k]:
            total += max(sims[j], 0.0) ** alpha * db[j]
        out.append(total)
    return unit(out)


def ref_aqe(db, q, k, alpha, own=None):
    q = unit([q])[0]
    sims = db @ q
    total = q.copy()
    for j in ranked(sims, skip=own)[:k]:
        total += max(sims[j], 0.0) ** alpha * db[j]
    return unit([total])[0]


def ref_krr(collection, k1, k2, lam):
    """The k-reciprocal scores of rows 1.. of `collection` for its row 0, as Zhong et al. define them."""
    x = unit(collection)
    m = len(x)
    k1, k2 = min(k1, m - 1), min(k2, m)
    half = math.ceil(k1 / 2)
    sims = x @ x.T
    lists = [[i] + ranked(sims[i], skip=i) for i in range(m)]

    def near(i, k):
        return set(lists[i][: k + 1])

    def reciprocal(i, k):
        return {g for g in near(i, k) if i in near(g, k)}

    v = np.zeros((m, m))
    for i in range(m):
        r = reciprocal(i, k1)
        star = set(r)
        for c in r:
            rc = reciprocal(c, half)
            if len(r & rc) >= 2 / 3 * len(rc):
                star |= rc
        weights = {g: math.exp(-(1 - sims[i, g])) for g in star}
        for g, w in weights.items():
            v[i, g] = w / sum(weights.values())
    vq = np.array([v[lists[i][:k2]].mean(axis=0) for i in range(m)])
    jaccard = np.array([np.minimum(vq[0], vq[g]).sum() / np.maximum(vq[0], vq[g]).sum() for g in range(1, m)])
    return (1 - lam) * jaccard + lam * sims[0, 1:]


def ref_ranking(scores, k):
    """(scores, rows) of the k best, ties to the lower row."""
    rows = ranked(scores)[:k]
    return np.array([scores[r] for r in rows]), np.array(rows)


def assert_same_ranking(got, want, atol=1e-5):
    """Same scores rank by rank, and the same rows wherever the reference's scores are not tied."""
    (got_s, got_r), (want_s, want_r) = got, want
    np.testing.assert_allclose(got_s, want_s, atol=atol)
    for pos, (g, w) in enumerate(zip(got_r, want_r)):
        if g != w:
            tied = np.isclose(want_s, want_s[pos], atol=atol)
            assert g in set(want_r[tied]), (pos, got_r, want_r)


def exact_vectors(n, seed):
    """Unit vectors with components in {0, +-0.5, +-1}: every cosine is exact in float32, and the set
    holds exact duplicates and many equal similarities (ties)."""
    rng = np.random.default_rng(seed)
    pool = np.concatenate([np.eye(4), -np.eye(4),
                           0.5 * np.array(np.meshgrid(*[[-1, 1]] * 4)).reshape(4, -1).T])
    return pool[rng.integers(0, len(pool), n)].astype(np.float32)


def gaussian(n, d, seed):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def spec(text):
    return rr.parse_rerank_list([text])


# --- the maths against the references --------------------------------------------------------


@pytest.mark.parametrize("k, alpha", [(1, 0.0), (3, 0.0), (3, 2.0), (50, 1.0)])  # 50: more than the rows
def test_dba_equals_the_reference_with_ties_and_a_large_k(k, alpha):
    db = exact_vectors(12, 0)
    assert len({tuple(v) for v in db}) < 12  # exact duplicates: equal similarities to break by row
    np.testing.assert_allclose(rr.dba(db, k, alpha), ref_dba(db, min(k, 11), alpha), atol=1e-6)
    assert np.allclose(rr.dba(db, 50, 0.0), unit([db.sum(axis=0)] * 12), atol=1e-6)  # k >= N - 1: the mean of all


def test_dba_in_small_blocks_and_with_faiss_equals_the_reference(monkeypatch):
    db = gaussian(300, 16, 1)
    want = ref_dba(db, 2, 3.0)
    monkeypatch.setattr(nb, "BLOCK_FLOATS", 300 * 7)  # seven-row blocks: the running top-k is merged many times
    np.testing.assert_allclose(rr.dba(db, 2, 3.0, backend="numpy"), want, atol=1e-5)
    pytest.importorskip("faiss", reason="FAISS is optional (pip install faiss-cpu)")
    np.testing.assert_allclose(rr.dba(db, 2, 3.0, backend="faiss"), want, atol=1e-5)


@pytest.mark.parametrize("k, alpha", [(1, 3.0), (2, 3.0), (4, 0.0), (40, 1.0)])
def test_aqe_equals_the_reference_with_ties_exclusion_and_a_large_k(k, alpha):
    db = exact_vectors(15, 2)
    queries = np.concatenate([exact_vectors(3, 3), db[[4, 9]], -db[[0]]])  # -db[0]: negative similarities
    own = np.array([-1, -1, -1, 4, 9, -1])
    got = rr.aqe(db, queries, k, alpha, own)
    want = [ref_aqe(unit(db), q, k, alpha, None if o < 0 else o) for q, o in zip(queries, own)]
    np.testing.assert_allclose(got, want, atol=1e-6)
    reranker = rr.Reranker(db, spec(f"aqe:k={k},alpha={alpha}"))
    for q, o, w in zip(queries, own, want):
        scores = unit(db) @ w
        if o >= 0:
            scores[o] = -np.inf
        got_top = reranker.top_k(q[None], 20, np.array([o]))
        keep = got_top[1][0] >= 0
        assert keep.sum() == (14 if o >= 0 else 15)  # k above N: all rows, less the query's own
        assert_same_ranking((got_top[0][0][keep], got_top[1][0][keep]), ref_ranking(scores, int(keep.sum())))


def test_krr_over_the_whole_collection_equals_the_reference_with_ties():
    db = exact_vectors(24, 4)
    q = exact_vectors(1, 5)
    for k1, k2, lam in [(20, 6, 0.3), (4, 3, 0.3), (6, 1, 0.0), (60, 50, 0.5)]:  # k1, k2 above the collection too
        want = ref_krr(np.vstack([q, db]), k1, k2, lam)
        reranker = rr.Reranker(db, spec(f"krr:k1={k1},k2={k2},lambda={lam},n=100"))
        np.testing.assert_allclose(reranker.scores(q)[0], want, atol=1e-5)
        assert_same_ranking(tuple(a[0] for a in reranker.top_k(q, 24)), ref_ranking(want, 24))


def test_krr_rescores_a_shortlist_and_keeps_the_plain_order_after_it():
    db = gaussian(80, 12, 6)
    q = gaussian(1, 12, 7)
    cos = unit(db) @ unit(q)[0]
    short = ranked(cos)[:30]
    reranker = rr.Reranker(db, spec("krr:k1=8,k2=3,lambda=0.3,n=30"))
    want = 0.3 * cos
    by_row = sorted(short)  # the shortlist as a collection in row order: ties go to the lower row
    want[by_row] = ref_krr(np.vstack([q, db[by_row]]), 8, 3, 0.3)
    np.testing.assert_allclose(reranker.scores(q)[0], want, atol=1e-5)
    scores, rows = reranker.top_k(q, 50)
    assert set(rows[0][:30]) == set(short) and list(rows[0][30:]) == ranked(cos)[30:50]
    assert_same_ranking((scores[0], rows[0]), ref_ranking(want, 50))


def test_krr_with_lambda_1_is_the_plain_cosine_ranking():
    db = gaussian(60, 10, 8)
    q = gaussian(3, 10, 9)
    scores, rows = rr.Reranker(db, spec("krr:lambda=1")).top_k(q, 60)
    plain = nb.top_k(db, q, 60, backend="numpy")
    assert np.array_equal(rows, plain[1])
    np.testing.assert_allclose(scores, plain[0], atol=1e-6)


def test_a_pipeline_is_dba_then_aqe_then_krr():
    db = gaussian(50, 8, 10)
    q = gaussian(2, 8, 11)
    reranker = rr.Reranker(db, spec("dba:k=3,alpha=1,aqe:k=2,alpha=3,aqe:k=4,alpha=0,krr:k1=6,k2=2,n=50"))
    augmented = ref_dba(db, 3, 1.0)
    np.testing.assert_allclose(reranker.db, augmented, atol=1e-5)
    for query in q:
        expanded = ref_aqe(augmented, ref_aqe(augmented, query, 2, 3.0), 4, 0.0)
        np.testing.assert_allclose(reranker.expand(query[None])[0], expanded, atol=1e-5)
        want = ref_krr(np.vstack([expanded, augmented]), 6, 2, 0.3)
        assert_same_ranking(tuple(a[0] for a in reranker.top_k(query[None], 10)), ref_ranking(want, 10))


@pytest.mark.parametrize("steps", ["aqe:k=3", "krr:k1=5,k2=2,n=20", "aqe,krr:k1=5,n=10"])
def test_a_query_from_the_database_searches_as_if_its_row_were_gone(steps):
    """exclude[i]: leave-one-out, the row neither expands the query nor is a candidate nor a result."""
    db = gaussian(40, 6, 12)
    for i in (0, 17, 39):
        scores, rows = rr.Reranker(db, spec(steps)).top_k(db[i : i + 1], 39, np.array([i]))
        without = np.delete(db, i, axis=0)
        want_scores, want_rows = rr.Reranker(without, spec(steps)).top_k(db[i : i + 1], 39)
        assert np.array_equal(rows[0], np.where(want_rows[0] >= i, want_rows[0] + 1, want_rows[0]))
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_scores_rank_like_top_k_and_mark_the_excluded_row():
    db = gaussian(70, 8, 13)
    for steps in ("aqe", "dba,aqe:k=3", "dba,krr:k1=10,n=25"):
        reranker = rr.Reranker(db, spec(steps))
        own = np.arange(70)
        full = reranker.scores(db, own)
        assert np.isneginf(full[own, own]).all() and np.isfinite(full[~np.eye(70, dtype=bool)]).all()
        scores, rows = reranker.top_k(db, 69, own)
        for i in range(70):
            assert_same_ranking((scores[i], rows[i]), ref_ranking(full[i], 69))


def test_top_k_gives_scores_tied_with_the_k_th_to_the_lowest_rows(monkeypatch):
    db = exact_vectors(200, 15)
    queries = exact_vectors(6, 16)
    monkeypatch.setattr(nb, "BLOCK_FLOATS", 6 * 30)  # 30-row blocks: ties straddle the merges
    for k in (1, 3, 7, 40):
        scores, rows = nb.top_k(db, queries, k, backend="numpy")
        for q, got in zip(unit(queries), rows):
            assert got.tolist() == ranked(unit(db) @ q)[:k]


def test_top_k_excluding_pads_a_query_that_lost_its_row_to_a_large_k():
    db = exact_vectors(5, 14)
    scores, rows = nb.top_k_excluding(db, db[[2, 3]], 9, np.array([2, -1]))
    assert rows.shape == (2, 5)
    assert 2 not in rows[0][:4] and rows[0][4] == -1 and np.isneginf(scores[0][4])
    assert sorted(rows[1]) == [0, 1, 2, 3, 4]


# --- specs ----------------------------------------------------------------------------------------


def test_specs_parse_with_defaults_in_the_order_given():
    steps = rr.parse_rerank_list(["dba:k=3", "aqe:k=2,alpha=1.5,krr:lambda=0.5"])
    assert [(s.method, s.params) for s in steps] == [
        ("dba", {"k": 3, "alpha": 0}), ("aqe", {"k": 2, "alpha": 1.5}),
        ("krr", {"k1": 20, "k2": 6, "lambda": 0.5, "n": 100})]
    assert [str(s) for s in steps] == ["dba:k=3", "aqe:alpha=1.5", "krr:lambda=0.5"]
    assert [s.method for s in rr.parse_rerank_list(["DBA,aqe", " krr "])] == ["dba", "aqe", "krr"]


@pytest.mark.parametrize("values, message", [
    (["qe"], r"unknown re-ranking 'qe'; valid: dba:k=2,alpha=0, aqe:k=2,alpha=3, krr:k1=20,k2=6,lambda=0.3,n=100"),
    (["aqe:beta=2"], r"bad parameter 'beta=2' in re-ranking 'aqe:beta=2'; its parameters: k \(default 2\), "
                     r"alpha \(default 3\)"),
    (["aqe:k"], r"bad parameter 'k' in re-ranking 'aqe:k'"),
    (["aqe:k=two"], r"parameter k of re-ranking 'aqe:k=two' must be a number, got 'two'"),
    (["aqe:k=2.5"], r"must be a whole number, got '2.5'"),
    (["aqe:k=0"], r"parameter k of re-ranking 'aqe:k=0' must be >= 1, got '0'"),
    (["aqe:alpha=-1"], r"alpha .* must be >= 0"),
    (["aqe:alpha=inf"], r"must be finite, got 'inf'"),
    (["krr:lambda=1.5"], r"lambda .* must be between 0 and 1, got '1.5'"),
    (["krr:n=5000"], r"n .* must be between 1 and 2000, got '5000'"),
    (["dba:k=2,k=3"], r"parameter k given twice in re-ranking 'dba:k=2,k=3'"),
    (["dba,,aqe"], r"--rerank 'dba,,aqe' has an empty item"),
    ([""], r"--rerank '' is empty"),
    (["aqe", "dba"], r"dba rewrites the database, so it comes before aqe and krr \(got aqe, dba\)"),
    (["krr,aqe"], r"krr ranks the final candidates, so it comes last and once \(got krr, aqe\)"),
    (["krr", "krr:k1=5"], r"comes last and once"),
])
def test_bad_specs_are_one_clear_error(values, message):
    with pytest.raises(GplError, match=message) as caught:
        rr.parse_rerank_list(values)
    assert caught.value.exit_code == 2


def test_the_reranker_refuses_steps_out_of_order():
    with pytest.raises(GplError, match="comes before"):
        rr.Reranker(gaussian(5, 3, 0), [rr.parse_rerank_spec("aqe"), rr.parse_rerank_spec("dba")])


# --- gpl neighbors --rerank ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory, lite0):
    """sample_images embedded with avg, and the vectors read back without gpl's reader."""
    from gpl_cli.embedding.config import EmbedConfig, RunOptions
    from gpl_cli.embedding.inputs import collect_inputs
    from gpl_cli.store.output import Output

    root = tmp_path_factory.mktemp("rerank")
    shutil.copytree(SAMPLE_IMAGES, root / "photos", ignore=shutil.ignore_patterns("*.md"))
    out = root / "photos.h5"
    embed_to(EmbedConfig(pools=("avg",)), collect_inputs([str(root / "photos")]), Output.resolve(str(out)),
             RunOptions(), backbone=lite0)
    with h5py.File(out) as f:
        paths = [p.decode() for p in f["paths"][...]]
        vectors = f["embeddings"]["avg"][...]
    return root, out, paths, vectors


def test_neighbors_rerank_of_a_row_query_is_leave_one_out(photo_file):
    root, out, paths, vectors = photo_file
    proc = run_gpl("neighbors", str(out), "panda.jpg", "sheep.jpg", "-k", "20", "--json",
                   "--rerank", "dba:k=2", "--rerank", "aqe:k=2,alpha=3", cwd=root)
    assert proc.returncode == 0, proc.stderr.decode()
    db = ref_dba(vectors, 2, 0.0)
    for result, name in zip(json.loads(proc.stdout), ["panda.jpg", "sheep.jpg"]):
        own = paths.index(name)
        query = ref_aqe(db, unit(vectors)[own], 2, 3.0, own)  # the query: its own vector, not its augmented one
        scores = db @ query
        scores[own] = -np.inf
        want = ref_ranking(scores, len(paths) - 1)
        assert result["source"] == "file" and name not in [n["path"] for n in result["neighbors"]]
        assert [n["rank"] for n in result["neighbors"]] == list(range(1, len(paths)))  # -k 20: the 14 others
        got = (np.array([n["score"] for n in result["neighbors"]]), np.array([paths.index(n["path"]) for n in result["neighbors"]]))
        assert_same_ranking(got, want)


def test_neighbors_rerank_of_an_outside_image_and_text_output(photo_file, tmp_path):
    root, out, paths, vectors = photo_file
    shutil.copy(SAMPLE_IMAGES / "coffee.png", tmp_path / "my coffee.png")  # the same image, outside the file
    proc = run_gpl("neighbors", str(out), str(tmp_path / "my coffee.png"), "-k", "4", "--rerank",
                   "aqe:k=3,alpha=1,krr:k1=5,k2=2", "--html", str(tmp_path / "page.html"), cwd=root)
    assert proc.returncode == 0, proc.stderr.decode()
    db = unit(vectors)
    query = ref_aqe(db, db[paths.index("coffee.png")], 3, 1.0)  # embedded like its row, and not left out
    want_scores, want_rows = ref_ranking(ref_krr(np.vstack([query, db]), 5, 2, 0.3), 4)
    lines = proc.stdout.decode().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["1", "2", "3", "4"]
    assert lines[0].endswith("\tcoffee.png")  # its copy in the file is a candidate like any other
    assert_same_ranking((np.array([float(x.split("\t")[1]) for x in lines]),
                         np.array([paths.index(x.split("\t")[2]) for x in lines])), (want_scores, want_rows), atol=1e-3)
    page = Page((tmp_path / "page.html").read_text())
    assert "re-ranked with aqe:k=3,alpha=1, krr:k1=5,k2=2" in " ".join(page.text)
    assert page.images()[1:] == [x.split("\t")[2] for x in lines]


def test_neighbors_rerank_errors_and_help(photo_file):
    root, out, paths, vectors = photo_file
    for args, message in [
        (["panda.jpg", "--rerank", "aqe:k=0"], "gpl: error: parameter k of re-ranking 'aqe:k=0' must be >= 1, got '0'"),
        (["--duplicates", "--rerank", "aqe"], "gpl: error: --rerank applies to queries only, not to --duplicates"),
        (["--outliers", "--rerank", "dba"], "gpl: error: --rerank applies to queries only, not to --outliers"),
    ]:
        proc = run_gpl("neighbors", str(out), *args, cwd=root)
        assert proc.returncode == 2 and proc.stdout == b""
        assert proc.stderr.decode().strip() == message
    usage = run_gpl("neighbors", "--help").stdout.decode()
    for method in rr.METHODS.values():
        assert method.usage() in " ".join(usage.split())
