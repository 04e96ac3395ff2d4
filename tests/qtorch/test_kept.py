import gc
import weakref

import pytest
import torch

from qtorch._kept import ByTensor


def test_entries_are_found_by_identity_never_by_value():
    kept = ByTensor()
    a, b = torch.zeros(3), torch.zeros(3)
    kept[a] = 1
    assert kept.get(a) == 1 and kept[a] == 1 and a in kept
    assert kept.get(b) is None and kept.get(b, 7) == 7 and b not in kept
    with pytest.raises(KeyError):
        kept[b]
    kept[a] = 2  # replaced, not added
    assert kept[a] == 2 and len(kept) == 1


def test_an_entry_goes_with_its_tensor_and_never_keeps_it_alive():
    kept = ByTensor()
    t = torch.ones(4)
    ref = weakref.ref(t)
    kept[t] = ("plan", torch.ones(2))
    del t
    gc.collect()
    assert ref() is None and len(kept) == 0


def test_a_freed_tensors_late_callback_never_drops_a_newer_entry_under_the_same_id():
    kept = ByTensor()
    old = torch.zeros(1)
    kept[old] = "old"
    k, (old_ref, _) = id(old), kept._entries[id(old)]
    new = torch.zeros(1)
    kept._entries[k] = (weakref.ref(new), "new")  # as if ``new`` had reused the id before old's callback ran
    del old
    gc.collect()
    assert old_ref() is None and kept._entries[k][1] == "new"
    kept._entries.pop(k)


def test_a_stale_entry_under_a_reused_id_is_not_found():
    kept = ByTensor()
    a = torch.zeros(1)
    kept[a] = "a"
    b = torch.zeros(1)
    kept._entries[id(b)] = kept._entries[id(a)]  # the entry of another tensor under b's id
    assert kept.get(b) is None and b not in kept
