"""The catalog, without Ray: every reader of an output (load_features, search, the probe's data,
the summary) sees finished runs only, ordered by commit time, each input once with its latest row.

The output is written through the real commit protocol (`RunLayout` + `PartWriter`):

    zeta   finished, committed first: inputs 0..5
    omega  a rerun of the same inputs published past its error budget (no _SUCCESS)
    alpha  finished, committed last (an --incremental run): input 2 changed, input 6 is new

Run names sort the other way round from their commits, so "newest by name" would be wrong.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resnet_features.core import storage
from resnet_features.core.errors import SearchError
from resnet_features.core.models import resolve_model
from resnet_features.extract.outputs import for_task
from resnet_features.extract.writer import PartWriter
from resnet_features.runs import protocol
from resnet_features.runs.catalog import Catalog, load_features
from resnet_features.tools import probe, search

N = 6
DIM = 512
URIS = [f"/data/cls{i % 2}/img{i:02d}.jpg" for i in range(N + 1)]  # URIS[N]: new in alpha
RNG = np.random.default_rng(0)
VECTORS = {run: RNG.normal(size=(N + 1, DIM)).astype(np.float32)
           for run in ("zeta", "omega", "alpha")}


def _listing(indices: list[int], fingerprints: dict[int, str]) -> pa.Table:
    return pa.table({"index": np.arange(len(indices), dtype=np.int64),
                     "uri": [URIS[i] for i in indices],
                     "size_bytes": np.ones(len(indices), np.int64),
                     "fingerprint": [fingerprints.get(i, f"{i}:mtime:0") for i in indices]})


def _result_batch(listing: pa.Table, vectors: np.ndarray, indices: list[int]) -> dict:
    n = listing.num_rows
    return {"index": listing.column("index").to_numpy(),
            "uri": np.asarray(listing.column("uri").to_pylist(), dtype=object),
            "fingerprint": np.asarray(listing.column("fingerprint").to_pylist(), dtype=object),
            "size_bytes": listing.column("size_bytes").to_numpy(),
            "embedding": vectors[indices],
            "width": np.full(n, 10), "height": np.full(n, 10),
            "error_stage": np.full(n, "", dtype=object), "error_type": np.full(n, "", dtype=object),
            "error_message": np.full(n, "", dtype=object)}


def _write_run(out: str, run_id: str, indices: list[int], *, success: bool, committed_at: str,
               fingerprints: dict[int, str] | None = None, monkeypatch) -> None:
    spec, _ = resolve_model("resnet18", "random")
    monkeypatch.setattr(protocol, "_now", lambda: committed_at)
    fs, root = storage.filesystem(out)
    layout = protocol.RunLayout(fs, root, run_id)
    identity = protocol.task_identity(spec, "embed", 5)
    state = layout.start_attempt(protocol.fingerprint_of(identity), fresh=False)
    listing = _listing(indices, fingerprints or {})
    writer = PartWriter(layout.staging_uri(), units=for_task(spec, "embed"),
                        n_inputs=listing.num_rows, rows_per_file=2, file_metadata={},
                        attempt=state.attempt)
    writer.add(_result_batch(listing, VECTORS[run_id], indices))
    writer.close()
    summary = {"run": run_id, "model": "resnet18", "status": "succeeded" if success else "failed"}
    layout.stage_manifest(summary, identity, success=success)
    layout.publish()


@pytest.fixture
def output(tmp_path, monkeypatch) -> str:
    out = str(tmp_path / "out")
    _write_run(out, "zeta", list(range(N)), success=True, committed_at="2024-05-01T00:00:00Z",
               monkeypatch=monkeypatch)
    _write_run(out, "omega", list(range(N)), success=False, committed_at="2024-05-02T00:00:00Z",
               monkeypatch=monkeypatch)
    _write_run(out, "alpha", [2, N], success=True, committed_at="2024-05-03T00:00:00Z",
               fingerprints={2: "2:mtime:changed"}, monkeypatch=monkeypatch)
    # A stray file in a finished run (no manifest lists it): never data.
    first = sorted(f for f in os.listdir(os.path.join(out, "run=alpha")) if f.startswith("part-"))
    shutil.copy(os.path.join(out, "run=alpha", first[0]),
                os.path.join(out, "run=zeta", "part-09999.parquet"))
    assert os.path.exists(os.path.join(out, "run=omega", "_manifest.json"))
    assert not os.path.exists(os.path.join(out, "run=omega", "_SUCCESS"))
    return out


def _expected_run(i: int) -> str:
    return "alpha" if i in (2, N) else "zeta"


def _expected_vector(i: int) -> np.ndarray:
    return VECTORS[_expected_run(i)][i]


def test_catalog_runs_order_summary_and_streaming(output):
    cat = Catalog.open(output)
    assert [r.run_id for r in cat.runs] == ["zeta", "alpha"]  # by commit; omega is not data
    assert cat.latest_summary()["run"] == "alpha"
    assert search.read_summary(output)["run"] == "alpha"
    assert cat.num_rows() == N + 1
    batches = list(cat.iter_batches(["uri", "embedding"], batch_size=1))
    assert all(b.num_rows <= 1 for b in batches)
    uris = [u for b in batches for u in b.column("uri").to_pylist()]
    assert sorted(uris) == sorted(URIS)  # each input exactly once
    assert cat.read(["embedding"]).column_names == ["embedding", "run"]


def test_load_features_latest_row_per_input(output):
    table = load_features(output)
    assert table.column("uri").to_pylist() == sorted(URIS)
    for row in table.to_pylist():
        i = URIS.index(row["uri"])
        assert row["run"] == _expected_run(i)
        np.testing.assert_array_equal(row["embedding"], _expected_vector(i))
    # run= reads one finished run whole, superseded rows included; a failed run is no data
    zeta = load_features(output, run="zeta", columns=["embedding"])
    assert zeta.column("uri").to_pylist() == sorted(URIS[:N])
    assert set(zeta.column("run").to_pylist()) == {"zeta"}
    with pytest.raises(SearchError):
        load_features(output, run="omega")


def test_search_sees_each_input_once_with_its_latest_row(output, tmp_path):
    n = N + 1
    # Queries: every vector ever written, the failed run's and the superseded one's included.
    queries = np.concatenate([VECTORS["zeta"][:N], VECTORS["omega"][:N], VECTORS["alpha"][[2, N]]])
    res = search.exact_search(queries, search.iter_embeddings(search.open_output(output),
                                                              batch_rows=2), k=n)
    for row in res.uris:
        assert sorted(row) == sorted(URIS)  # every input, each at most once
    best = res.scores[:, 0]
    # Only live rows are searched: a live row scores 1 against itself, nothing else does.
    live = [True] * N + [False] * N + [True, True]
    live[2] = False  # zeta's row of input 2 was superseded by alpha's
    np.testing.assert_allclose(best[np.array(live)], 1.0, rtol=1e-5)
    assert (best[~np.array(live)] < 0.5).all()
    assert res.uris[2 * N, 0] == URIS[2]  # the changed image's query finds its new row

    # The CLI, with the output as its own query set: queries and neighbours each once.
    out = str(tmp_path / "nn.parquet")
    assert search.main(["--index", output, "--query-output", output, "--out", out,
                        "-k", str(n)]) == 0
    result = pq.read_table(out).to_pylist()
    by_query: dict[str, list[str]] = {}
    for r in result:
        by_query.setdefault(r["query"], []).append(r["neighbor_uri"])
    assert sorted(by_query) == sorted(URIS)
    assert all(sorted(v) == sorted(URIS) and v[0] == q for q, v in by_query.items())

    if search.faiss_available():
        approx = search.faiss_search(queries, search.open_output(output), k=n,
                                     index_factory="IVF2,Flat", nprobe=2)  # all lists
        assert all(sorted(row) == sorted(URIS) for row in approx.uris)


def test_probe_data_is_the_catalogs(output):
    uris, emb, labels = probe.load_labelled(output, "column:run")
    assert sorted(uris) == sorted(URIS)
    for u, e, lab in zip(uris, emb, labels):
        i = URIS.index(u)
        assert lab == _expected_run(i)
        np.testing.assert_array_equal(e, _expected_vector(i))
    uris, _, labels = probe.load_labelled(output, "folder")
    assert sorted(uris) == sorted(URIS)
    assert list(labels) == [u.split("/")[-2] for u in uris]


def test_probe_cli_reads_the_catalog(output, tmp_path):
    import json

    assert probe.main(["--input", output, "--labels", "column:run", "--out", str(tmp_path / "p"),
                       "--epochs", "5"]) == 0
    metrics = json.load(open(tmp_path / "p" / "metrics.json"))
    assert metrics["classes"] == ["alpha", "zeta"]  # the failed run "omega" is no class
    assert metrics["n_train"] + metrics["n_val"] == N + 1


def test_empty_output(tmp_path):
    cat = Catalog.open(str(tmp_path / "nothing"))
    assert cat.runs == () and cat.num_rows() == 0
    assert load_features(str(tmp_path / "nothing")).column_names == ["uri", "run"]
    with pytest.raises(SearchError):
        cat.latest_summary()
