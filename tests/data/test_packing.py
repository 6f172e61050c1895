"""Packing a stream into rows, and the deterministic, resumable batch order."""

import itertools

import numpy as np
import pytest

from sparse_lm.data import PackedSequences, batch_iterator, num_batches, pack_sequences


def test_pack_drops_the_remainder():
    packed = pack_sequences(np.arange(10, 20), 4)
    assert packed.tokens.dtype == np.int32 and len(packed) == 2 and packed.seq_len == 4
    np.testing.assert_array_equal(packed.tokens, [[10, 11, 12, 13], [14, 15, 16, 17]])
    assert packed.mask.all() and packed.mask.shape == (2, 4)


def test_pack_pads_the_remainder():
    packed = pack_sequences(np.arange(10, 20), 4, drop_remainder=False, pad_id=7)
    np.testing.assert_array_equal(packed.tokens, [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19, 7, 7]])
    np.testing.assert_array_equal(packed.mask[2], [True, True, False, False])
    assert packed.mask[:2].all()
    exact = pack_sequences(np.arange(10, 18), 4, drop_remainder=False)
    np.testing.assert_array_equal(exact.tokens, [[10, 11, 12, 13], [14, 15, 16, 17]])
    assert exact.mask.all()
    short = pack_sequences(np.array([5, 6]), 4, drop_remainder=False)
    np.testing.assert_array_equal(short.tokens, [[5, 6, 0, 0]])


@pytest.mark.parametrize("seq_len", [0, -3, True, 2.0])
def test_bad_seq_len(seq_len):
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        pack_sequences(np.arange(8), seq_len)


def test_bad_streams():
    with pytest.raises(ValueError, match="tokens is empty: nothing to pack into rows of seq_len=4"):
        pack_sequences(np.zeros(0, dtype=np.int32), 4)
    with pytest.raises(ValueError, match="only 3 tokens, fewer than seq_len=4"):
        pack_sequences(np.arange(3), 4)
    with pytest.raises(ValueError, match="1-D integer array"):
        pack_sequences(np.ones(8), 4)


def _rows(n: int) -> PackedSequences:
    """Row i holds [10 i, 10 i + 1] so a batch's tokens tell which rows it holds."""
    return pack_sequences(np.arange(2 * n) + 8 * (np.arange(2 * n) // 2), 2)


def _row_ids(batch: PackedSequences) -> list[int]:
    return (batch.tokens[:, 0] // 10).tolist()


def test_batches_in_order():
    batches = list(batch_iterator(_rows(7), 3, shuffle=False))
    assert [_row_ids(batch) for batch in batches] == [[0, 1, 2], [3, 4, 5]]
    np.testing.assert_array_equal(batches[1].tokens, [[30, 31], [40, 41], [50, 51]])
    last = list(batch_iterator(_rows(7), 3, shuffle=False, drop_remainder=False))[-1]
    assert _row_ids(last) == [6]
    assert num_batches(7, 3) == 2 and num_batches(7, 3, drop_remainder=False) == 3


def test_shuffled_epochs_are_permutations_and_reproducible():
    packed = _rows(12)
    batches = [_row_ids(b) for b in batch_iterator(packed, 4, shuffle=True, seed=3, num_epochs=2)]
    assert len(batches) == 6
    epoch_0, epoch_1 = sum(batches[:3], []), sum(batches[3:], [])
    assert sorted(epoch_0) == sorted(epoch_1) == list(range(12))
    assert epoch_0 != epoch_1 and epoch_0 != list(range(12))
    again = [_row_ids(b) for b in batch_iterator(packed, 4, shuffle=True, seed=3, num_epochs=2)]
    assert again == batches
    other_seed = [_row_ids(b) for b in batch_iterator(packed, 4, shuffle=True, seed=4, num_epochs=2)]
    assert other_seed != batches


@pytest.mark.parametrize("start_batch", [0, 1, 3, 5, 6])
def test_resume_continues_the_same_sequence(start_batch):
    packed = _rows(10)
    full = [_row_ids(b) for b in batch_iterator(packed, 3, shuffle=True, seed=1, num_epochs=2)]
    resumed = batch_iterator(packed, 3, shuffle=True, seed=1, num_epochs=2, start_batch=start_batch)
    assert [_row_ids(b) for b in resumed] == full[start_batch:]


def test_endless_iterator_and_masks_travel_with_rows():
    packed = pack_sequences(np.arange(10, 15), 2, drop_remainder=False)
    endless = batch_iterator(packed, 3, shuffle=True, seed=0, num_epochs=None)
    for batch in itertools.islice(endless, 7):
        assert batch.tokens.shape == (3, 2)
        # the only padded position is after token 14, in the row that starts with it
        np.testing.assert_array_equal(~batch.mask, (batch.tokens == 0) & (batch.tokens[:, :1] == 14))


def test_bad_batch_arguments():
    packed = _rows(4)
    with pytest.raises(ValueError, match="batch_size=5 exceeds the 4 packed sequences"):
        batch_iterator(packed, 5, shuffle=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        batch_iterator(packed, 0, shuffle=False)
    with pytest.raises(ValueError, match="start_batch must be a non-negative integer, got -1"):
        batch_iterator(packed, 2, shuffle=False, start_batch=-1)
