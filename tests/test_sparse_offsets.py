"""SparseEmbedding as nn.EmbeddingBag: jagged multi-hot bags through offsets, and padding_idx."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from downpour.errors import ConfigError, DataError
from downpour.nn import LocalTables, SparseEmbedding, attach
from downpour.sparse import SGD, SparseTable

DIM = 4


def _pair(mode, padding_idx=None, ids=range(0, 40)):
    """A SparseEmbedding on a local table and an nn.EmbeddingBag/Embedding holding the same rows (row i = ID i)."""
    tables = LocalTables(lambda name, dim: SparseTable(dim, SGD(0.5), seed=11, init_scale=0.5))
    ours = SparseEmbedding("t", DIM, mode=mode, padding_idx=padding_idx)
    attach(ours, tables)
    keys = np.array(list(ids), dtype=np.int64)
    weight = torch.from_numpy(tables._table("t", DIM).peek(keys)).clone()
    if padding_idx is not None:
        weight[padding_idx] = 0
    ref = (nn.EmbeddingBag.from_pretrained(weight, freeze=False, mode=mode, padding_idx=padding_idx) if mode
           else nn.Embedding.from_pretrained(weight, freeze=False, padding_idx=padding_idx))
    return ours, ref, tables


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_multi_hot_bags_with_offsets_match_embedding_bag_forward_and_gradients(mode):
    ours, ref, tables = _pair(mode)
    ids = torch.tensor([3, 7, 7, 1, 20, 5, 9, 3, 3, 3], dtype=torch.int64)
    offsets = torch.tensor([0, 3, 4, 4, 8])  # bags of 3, 1, 0 (empty), 4 and 2 IDs
    weights = torch.rand(len(ids)) if mode == "sum" else None
    ours.train()
    out = ours(ids, offsets, per_sample_weights=weights)
    expect = ref(ids, offsets, per_sample_weights=weights)
    assert torch.allclose(out, expect, atol=1e-6)
    target = torch.randn_like(expect)
    ((out - target) ** 2).sum().backward()
    ((expect - target) ** 2).sum().backward()
    tables.step()  # SGD lr 0.5 on the rows touched
    after = torch.from_numpy(tables._table("t", DIM).peek(np.arange(40, dtype=np.int64)))
    assert torch.allclose(after, ref.weight.detach() - 0.5 * ref.weight.grad, atol=1e-6)


def test_padding_ids_read_zeros_train_nothing_and_never_get_a_row():
    ours, ref, tables = _pair("mean", padding_idx=0)
    ids = torch.tensor([[0, 4, 0], [6, 6, 0], [0, 0, 0]], dtype=torch.int64)  # the last bag: padding only
    ours.train()
    out = ours(ids)
    assert torch.allclose(out, ref(ids), atol=1e-6)
    assert torch.equal(out[2], torch.zeros(DIM))
    out.sum().backward()
    tables.step()
    assert len(tables._table("t", DIM)) == 2  # rows for IDs 4 and 6 only: the pad ID was never fetched
    plain = SparseEmbedding("t", DIM, padding_idx=0)
    attach(plain, tables)
    emb = plain(torch.tensor([0, 4], dtype=torch.int64))
    assert torch.equal(emb[0], torch.zeros(DIM)) and not torch.equal(emb[1], torch.zeros(DIM))


def test_offsets_need_a_pooling_mode_and_flat_ids():
    ours, _, _ = _pair(None)
    with pytest.raises(ConfigError, match="offsets need mode sum or mean"):
        ours(torch.tensor([1, 2], dtype=torch.int64), torch.tensor([0]))


def test_a_table_embedding_reads_like_the_sparse_embedding_it_was_exported_from():
    from downpour.nn import TableEmbedding

    ours, _, tables = _pair("mean", padding_idx=0)
    ours.train()
    ours(torch.tensor([[4, 9, 6]], dtype=torch.int64))  # rows are created for 4, 6 and 9
    ids = torch.tensor([[0, 4, 9], [6, 6, 0], [0, 0, 0]], dtype=torch.int64)
    ours.eval()
    with torch.no_grad():
        expect = ours(ids)
    table = tables._table("t", DIM)
    keys = np.array([4, 6, 9], dtype=np.int64)
    plain = TableEmbedding(3, DIM, "mean", padding_idx=0)
    plain.load_state_dict({"ids": torch.from_numpy(keys), "weight": torch.from_numpy(table.peek(keys))})
    assert torch.allclose(plain(ids), expect, atol=1e-6)
    # An ID the table has no row for reads as zeros in the export (and counts in a mean).
    assert torch.allclose(plain(torch.tensor([[4, 123456]])), plain(torch.tensor([[4, 4]])) / 2, atol=1e-6)


@pytest.mark.slow
def test_an_export_of_dense_parameters_and_sparse_tables_runs_in_plain_pytorch_as_evaluated(tmp_path):
    from downpour.api import resolve_job
    from downpour.data.scoring import roc_auc
    from downpour.export import export_model, plain_model
    from downpour.launch import LocalLauncher
    from downpour.models import WideDeep
    from downpour.nn import TableEmbedding
    from tests.ctr_factories import tiny_ctr
    from tests.test_sparse_job import _ctr_job

    job = _ctr_job(epochs=2)
    job["checkpoint"] = {"enabled": True, "every_s": None, "at_end": True}
    result = LocalLauncher(resolve_job(job), str(tmp_path / "run")).run()
    assert result.summary["status"] == "ok"
    path = export_model(result.run_dir)
    exported = torch.load(path, weights_only=True)
    model = plain_model(WideDeep(num_dense=3, num_fields=4, dim=4, hidden=[16]), exported)
    assert isinstance(model.embedding, TableEmbedding) and len(model.embedding.ids) == 200
    test = tiny_ctr().test
    (dense, ids), y = test.take(np.arange(len(test)))
    with torch.no_grad():
        p = torch.sigmoid(model(dense, ids)).numpy()
    assert roc_auc(y.numpy(), p) == pytest.approx(result.summary["test_auc"], abs=1e-6)
    # Where the latest checkpoint is not the end of training's, its tables are older than model.pt:
    # the export is refused rather than pairing the two (it scored an AUC of 0.62 against 0.78).
    [manifest] = (tmp_path / "run" / "checkpoints").glob(f"{result.summary['checkpoints']['last']}/manifest.json")
    manifest.write_text(manifest.read_text().replace('"final": true', '"final": false'))
    with pytest.raises(DataError, match="is not the end of training's .* an export would pair the two"):
        export_model(result.run_dir)
