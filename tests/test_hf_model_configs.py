"""Every LlamaForCausalLM shape transformers runs: titan_cp's logits equal transformers' own.

Each folder is written by transformers (save_pretrained), so the config spelling, the tensor
names and the reference logits are all independent of titan_cp.
"""

import json
from pathlib import Path

import pytest
import torch

from tests.hf_utils import save_random_llama, save_tokenizer_files
from titan_cp.checkpoint.hf import export_hf, load_hf_args, load_hf_model
from titan_cp.checkpoint.hf_serving import serving_files
from titan_cp.data import Tokenizer
from titan_cp.errors import UserError
from titan_cp.models.llama3 import TransformerModelArgs

VOCAB, SEQ = 2048, 40  # the shipped tokenizer's vocabulary; longer than the llama3 scaling's original 16 positions

VARIANTS = {
    # head_dim 12 with hidden 32 / 4 heads: q/o projections are 48 wide, not 32.
    "head_dim_tied": dict(head_dim=12, tied=True, rope_scaling=None),
    "biases": dict(attention_bias=True, mlp_bias=True, rope_scaling=None),
    "rope_llama3": dict(rope_theta=10000.0),
}


@pytest.fixture(scope="module", params=VARIANTS)
def hf_variant(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    kwargs = {"rope_theta": 500000.0, **VARIANTS[request.param]}
    reference = save_random_llama(folder, vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                  num_attention_heads=4, **kwargs)  # fmt: skip
    return folder, reference


def test_logits_equal_transformers(hf_variant):
    folder, reference = hf_variant
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    model = load_hf_model(folder)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens).logits, rtol=0, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == model.args.num_params()
    assert model.args.num_params() == sum(p.numel() for p in reference.parameters())


def test_v4_and_v5_spellings_give_the_same_args(hf_variant):
    folder, _ = hf_variant
    v5 = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in v5  # transformers 5 writes this spelling
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4["rope_theta"] = v5["rope_parameters"]["rope_theta"]
    rope = {k: v for k, v in v5["rope_parameters"].items() if k != "rope_theta"}
    v4["rope_scaling"] = None if rope["rope_type"] == "default" else {**rope, "type": rope.pop("rope_type")}
    assert TransformerModelArgs.from_hf_config(v4) == load_hf_args(folder)


def test_exported_config_round_trips(hf_variant):
    folder, reference = hf_variant
    args = load_hf_args(folder)
    config = args.to_hf_config()
    assert TransformerModelArgs.from_hf_config(config) == args
    for key in ("head_dim", "attention_bias", "mlp_bias", "tie_word_embeddings"):
        assert config[key] == getattr(reference.config, key), key


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model_type": "mistral"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_parameters"),
        ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
    ],
    ids=["model_type", "hidden_act", "rope_yarn", "rope_dynamic_v4", "dropout"],
)
def test_unsupported_fields_are_named(change, field):
    shipped = Path(__file__).resolve().parent.parent / "assets" / "tiny_llama" / "config.json"
    config = {**json.loads(shipped.read_text()), **change}
    with pytest.raises(UserError, match=f"field '{field}'") as error:
        TransformerModelArgs.from_hf_config(config)
    assert "\n" not in str(error.value)


def test_export_serves_in_transformers(hf_variant, tmp_path):
    """The exported folder alone: transformers' logits equal titan_cp's, and generate stops and pads."""
    import transformers

    folder, _ = hf_variant
    save_tokenizer_files(folder)
    model = load_hf_model(folder)
    out = tmp_path / "export"
    export_hf(model, model.args, out, dtype=torch.float32, serving=serving_files(Tokenizer(folder), folder))
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 1, 2)

    served = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(served(tokens).logits, model(tokens), rtol=0, atol=1e-5)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    generated = served.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
