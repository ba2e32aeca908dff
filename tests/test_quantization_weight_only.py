from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.models import create_model
from torchslim.quantization import WeightOnly, sqnr_db
from torchslim.quantization.weight_only import GroupedWeightLinear
from torchslim.testing import assert_same_outputs


def test_int4_grouped_weights_keep_the_function_and_shrink_the_file(tmp_path: Path) -> None:
    model = create_model("lenet300", pretrained=False).eval()
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        reference = model(x)
    dense = ts.save(model, tmp_path / "fp32.slim").stat().st_size
    result = ts.apply_(model, WeightOnly(bits=4, group_size=10), targets=ts.Select(names=("fc2", "fc3")))
    ts.apply_(model, WeightOnly(bits=4, group_size=16), targets=ts.Select(names=("fc1",)))
    assert result["replaced"] == ["fc2", "fc3"]
    assert isinstance(model.fc1, GroupedWeightLinear)
    codes = model.fc1.codes
    assert float(codes.min()) >= -8 and float(codes.max()) <= 7
    with torch.no_grad():
        assert sqnr_db(reference, model(x)) > 15  # 4-bit weights: ~20 dB on these outputs
    path = ts.save(model, tmp_path / "int4.slim", encoding=ts.Encoding())
    assert path.stat().st_size < dense / 5  # ~4-bit codes plus one fp32 scale per group
    assert_same_outputs(model, ts.load(path), x)


def test_more_bits_and_smaller_groups_are_more_accurate() -> None:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 32))
    x = torch.randn(32, 64)
    reference = layer(x).detach()
    errors = {}
    for bits, group in ((4, 64), (4, 16), (8, 64)):
        model = nn.Sequential(nn.Linear(64, 32))
        model.load_state_dict(layer.state_dict())
        ts.apply_(model, WeightOnly(bits=bits, group_size=group))
        errors[(bits, group)] = sqnr_db(reference, model(x).detach())
    assert errors[(4, 16)] > errors[(4, 64)]
    assert errors[(8, 64)] > errors[(4, 16)] + 10


def test_group_size_must_divide_the_width() -> None:
    model = create_model("lenet300", pretrained=False)
    with pytest.raises(ConfigError, match=r"group_size=32 does not divide fc1 \(in_features 784\)"):
        ts.apply_(model, WeightOnly(bits=4, group_size=32))
    assert isinstance(model.fc1, nn.Linear)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_keeps_every_pruned_zero(act_order: bool, symmetric: bool) -> None:
    from torchslim.quantization.gptq import GPTQ, gptq_codes

    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    weight[torch.rand_like(weight) < 0.5] = 0  # what SparseGPT or magnitude pruning leaves
    inputs = torch.randn(512, 128) * torch.linspace(0.2, 3, 128)
    hessian = (inputs.T @ inputs).double() / 512
    codes, scales, zeros = gptq_codes(weight, hessian, GPTQ(bits=3, group_size=32, act_order=act_order,
                                                            symmetric=symmetric))
    restored = (codes.reshape(64, -1, 32).float() - zeros[:, :, None].float()) * scales[:, :, None]
    restored = restored.reshape(64, 128)
    assert torch.equal(restored[weight == 0], torch.zeros(int((weight == 0).sum())))
    assert bool((restored[weight != 0] != 0).float().mean() > 0.5)  # the rest still carry values


@pytest.mark.parametrize("options", [{}, {"act_order": True}, {"act_order": True, "symmetric": False}])
def test_gptq_clip_narrows_grids_around_outlier_weights_and_lowers_the_output_error(
        options: dict[str, bool]) -> None:
    from torchslim.quantization.gptq import GPTQ, gptq_codes

    torch.manual_seed(0)
    weight = torch.randn(32, 64) * 0.05
    weight[torch.rand(32, 64) < 0.03] *= 12  # a few outliers per group stretch the full range
    inputs = torch.randn(2048, 64)
    hessian = (inputs.T @ inputs).double() / 2048

    def quantized(clip: bool) -> tuple[float, torch.Tensor]:
        codes, scales, zeros = gptq_codes(weight, hessian, GPTQ(bits=3, group_size=16, clip=clip, **options))
        restored = (codes.reshape(32, -1, 16).float() - zeros[:, :, None]) * scales[:, :, None]
        restored = restored.reshape(32, 64)
        return float((inputs @ (restored - weight).T).pow(2).mean()), scales.abs()

    full_error, full_scales = quantized(False)
    clipped_error, clipped_scales = quantized(True)
    if options.get("act_order"):  # grids from the weights before any update: they only shrink
        assert bool((clipped_scales <= full_scales + 1e-9).all())
    assert float((clipped_scales < full_scales - 1e-9).float().mean()) > 0.3
    assert clipped_error < 0.98 * full_error


@pytest.mark.parametrize(("symmetric", "dtype"), [(True, torch.int8), (False, torch.uint8)])
def test_codes_take_one_byte_per_weight_in_memory_and_on_reload(tmp_path: Path, symmetric: bool,
                                                                 dtype: torch.dtype) -> None:
    model = create_model("lenet300", pretrained=False).eval()
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ts.apply_(model, WeightOnly(bits=8, group_size=4, symmetric=symmetric))
    layers = [m for m in model.modules() if isinstance(m, GroupedWeightLinear)]
    assert len(layers) == 3 and all(m.codes.dtype == dtype for m in layers)
    codes = layers[0].codes
    assert int(codes.min()) < 0 if symmetric else int(codes.max()) > 127  # the whole 8-bit range
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    # one byte per code, plus a float scale (and zero point) per 4; float codes would be > 1.25x
    assert held < (0.55 if symmetric else 0.8) * float_bytes
    x = torch.randn(8, 1, 28, 28)
    for encoding in (None, ts.Encoding()):
        loaded = ts.load(ts.save(model, tmp_path / f"m{encoding is None}.slim", encoding=encoding))
        assert loaded.fc1.codes.dtype == dtype
        assert_same_outputs(model, loaded, x)


@pytest.mark.parametrize("encoding", [None, ts.Encoding()])
def test_files_with_float_codes_from_older_versions_still_load(tmp_path: Path,
                                                                encoding: ts.Encoding | None) -> None:
    model = create_model("lenet300", pretrained=False).eval()
    ts.apply_(model, WeightOnly(bits=4, group_size=16), targets=ts.Select(names=("fc1",)))
    codes = model.fc1.codes.detach().clone()
    model.fc1.codes = nn.Parameter(codes.float(), requires_grad=False)  # how older versions held them
    path = ts.save(model, tmp_path / "older.slim", encoding=encoding)
    loaded = ts.load(path)
    assert loaded.fc1.codes.dtype == torch.int8 and torch.equal(loaded.fc1.codes, codes)
    assert_same_outputs(model, loaded, torch.randn(4, 1, 28, 28))


def test_decoded_codes_that_do_not_fit_their_integer_type_are_refused() -> None:
    from torchslim.artifact_checks import as_dtype
    from torchslim.errors import ArtifactError

    assert as_dtype(torch.tensor([-128.0, 127.0]), torch.int8, Path("f.slim"), "c").dtype == torch.int8
    for values, dtype in (([0.5], torch.int8), ([128.0], torch.int8), ([-1.0], torch.uint8)):
        with pytest.raises(ArtifactError, match="holds values that type cannot"):
            as_dtype(torch.tensor(values), dtype, Path("f.slim"), "fc1.codes")


def _tiny_llama(tied: bool = True) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def test_a_tied_head_and_its_embedding_become_one_table_of_codes(tmp_path: Path) -> None:
    from torchslim.quantization.weight_only import GroupedWeightEmbedding

    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    alone = _tiny_llama()
    result = ts.apply_(alone, WeightOnly(bits=8, group_size=32))
    assert isinstance(alone.lm_head, nn.Linear)  # tied: left, with the reason and the way out
    assert "embeddings=True" in result.skipped["lm_head"]

    model = _tiny_llama()
    dense = ts.save(model, tmp_path / "dense.slim").stat().st_size
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    result = ts.apply_(model, WeightOnly(bits=8, group_size=32, embeddings=True))
    head, table = model.lm_head, model.model.embed_tokens
    assert isinstance(head, GroupedWeightLinear) and isinstance(table, GroupedWeightEmbedding)
    assert table.codes is head.codes and table.scales is head.scales  # one table, not a copy
    assert {"lm_head", "model.embed_tokens"} <= set(result.changed) and not result.skipped
    with torch.no_grad():
        assert sqnr_db(reference, model(input_ids=ids).logits) > 30  # 8-bit codes everywhere
    path = ts.save(model, tmp_path / "int8.slim", encoding=ts.Encoding())
    assert path.stat().st_size < dense / 3  # the table is stored once, a byte or less per weight
    loaded = ts.load(path)
    assert loaded.model.embed_tokens.codes is loaded.lm_head.codes
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_embeddings_that_cannot_be_quantized_are_left_with_the_reason() -> None:
    from torchslim.quantization.weight_only import GroupedWeightEmbedding

    tied = _tiny_llama()
    result = ts.apply_(tied, WeightOnly(bits=4, group_size=32, embeddings=True),
                       targets=ts.Select(exclude=("lm_head",)))
    assert isinstance(tied.model.embed_tokens, nn.Embedding)
    assert "tied to lm_head, which the selection leaves out" in result.skipped["model.embed_tokens"]

    class Tagger(nn.Module):  # a user's model: an untied table of width 48 and a Linear head
        def __init__(self) -> None:
            super().__init__()
            self.words, self.tags = nn.Embedding(100, 48), nn.Embedding(10, 40)
            self.head = nn.Linear(48, 5)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.words(ids) + self.tags(ids % 10)[..., :1])

    model = Tagger().eval()
    result = ts.apply_(model, WeightOnly(bits=4, group_size=16, embeddings=True))
    assert isinstance(model.words, GroupedWeightEmbedding) and isinstance(model.tags, nn.Embedding)
    assert "width 40 is not a multiple of group_size=16" in result.skipped["tags"]
    ids = torch.randint(0, 100, (3, 7))
    assert model(ids).shape == (3, 7, 5)


def test_the_int4_kernel_runs_a_tied_head_and_says_it_copies_the_codes() -> None:
    from torchslim.quantization import Int4Kernel
    from torchslim.quantization.weight_only import GroupedWeightEmbedding
    from torchslim.runtime.int4_linear import Int4Linear

    model = _tiny_llama()
    ts.apply_(model, WeightOnly(bits=4, group_size=32, embeddings=True))
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    result = ts.apply_(model, Int4Kernel())
    assert isinstance(model.lm_head, Int4Linear)
    assert isinstance(model.model.embed_tokens, GroupedWeightEmbedding)
    assert "model.embed_tokens" in result["copied"]["lm_head"]
    with torch.no_grad():
        assert sqnr_db(before, model(input_ids=ids).logits) > 40  # the same codes, another kernel


def test_embedding_tables_can_keep_more_bits_than_the_linears() -> None:
    model = _tiny_llama()
    ts.apply_(model, WeightOnly(bits=4, group_size=32, embeddings=True, embedding_bits=8))
    table = model.model.embed_tokens.codes
    assert int(table.min()) < -8 or int(table.max()) > 7  # 8-bit codes in the shared table
    proj = model.model.layers[0].mlp.up_proj.codes
    assert int(proj.min()) >= -8 and int(proj.max()) <= 7  # 4-bit codes elsewhere


def test_an_8_bit_tied_table_runs_its_head_on_the_8_bit_kernel(tmp_path: Path) -> None:
    from torchslim.quantization import Int4Kernel
    from torchslim.runtime.int4_linear import Int4Linear

    for symmetric in (True, False):
        model = _tiny_llama()
        ts.apply_(model, WeightOnly(bits=4, group_size=32, embeddings=True, embedding_bits=8,
                                    symmetric=symmetric))
        ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            before = model(input_ids=ids).logits
        ts.apply_(model, Int4Kernel())
        head, up = model.lm_head, model.model.layers[0].mlp.up_proj
        assert isinstance(head, Int4Linear) and head.bits == 8
        assert isinstance(up, Int4Linear) and up.bits == 4
        with torch.no_grad():
            assert sqnr_db(before, model(input_ids=ids).logits) > 35  # the same codes, 8-bit kernel
        loaded = ts.load(ts.save(model, tmp_path / f"k{symmetric}.slim"))
        assert loaded.lm_head.bits == 8
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def _ungrouped(model: nn.Module) -> nn.Module:
    """A copy whose int4 layers each run their own kernel call."""
    import copy

    from torchslim.runtime.int4_linear import Int4Linear

    plain = copy.deepcopy(model)
    for layer in plain.modules():
        if isinstance(layer, Int4Linear):
            layer.shared = None
    return plain


def test_int4_layers_that_read_one_input_run_as_one_call_with_the_same_outputs(tmp_path: Path) -> None:
    from torchslim.quantization import Int4Kernel

    model = _tiny_llama(tied=False)
    ts.apply_(model, WeightOnly(bits=4, group_size=32))
    result = ts.apply_(model, Int4Kernel())  # no inputs given: two token ids of the language model
    groups = result["shared_input"]
    assert ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj"] in groups
    assert ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"] in groups
    assert len(groups) == 4  # o_proj, down_proj and lm_head read inputs of their own
    assert model.model.layers[0].self_attn.o_proj.shared is None
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        grouped = model(input_ids=ids).logits
        assert torch.equal(grouped, _ungrouped(model)(input_ids=ids).logits)
    loaded = ts.load(ts.save(model, tmp_path / "grouped.slim"))
    assert loaded.model.layers[1].mlp.up_proj.shared is loaded.model.layers[1].mlp.gate_proj.shared
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, grouped)
    assert loaded.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False).shape == (1, 15)


def test_a_grouped_int4_layer_called_in_another_order_or_on_another_input_stays_right() -> None:
    from torchslim.quantization import Int4Kernel

    class Twisted(nn.Module):  # a user's module: b before a, then a again on a new input
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(64, 32), nn.Linear(64, 48)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return self.b(x), self.a(x), self.a(x * 2)

    torch.manual_seed(0)
    model = Twisted().eval()
    x = torch.randn(5, 64)
    ts.apply_(model, WeightOnly(bits=4, group_size=32))
    result = ts.apply_(model, Int4Kernel(), example_inputs=x)
    assert result["shared_input"] == [["b", "a"]]
    with torch.no_grad():
        for got, want in zip(model(x), _ungrouped(model)(x), strict=True):
            assert torch.equal(got, want)
    bare = Twisted().eval()
    ts.apply_(bare, WeightOnly(bits=4, group_size=32))
    assert "not grouped: no example inputs" in ts.apply_(bare, Int4Kernel())["shared_input"]


def test_subclassed_layers_with_a_forward_of_their_own_are_left_with_the_reason() -> None:
    from torchslim.quantization.weight_only import GroupedWeightEmbedding

    class ScaledEmbedding(nn.Embedding):  # Gemma-style: the lookup times sqrt(width)
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) * 8.0

    class GatedLinear(nn.Linear):  # a Linear with its activation built in
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(super().forward(x))

    class PlainLinear(nn.Linear):  # no forward of its own: replaced like a Linear
        pass

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scaled, self.words = ScaledEmbedding(50, 32), nn.Embedding(50, 32)
            self.gated, self.out = GatedLinear(32, 32), PlainLinear(32, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.out(self.gated(self.scaled(ids) + self.words(ids)))

    model = Model().eval()
    ids = torch.randint(0, 50, (2, 5))
    reference = model(ids).detach()
    result = ts.apply_(model, WeightOnly(bits=8, group_size=16, embeddings=True))
    assert set(result.changed) == {"words", "out"}
    assert isinstance(model.words, GroupedWeightEmbedding) and isinstance(model.out, GroupedWeightLinear)
    assert type(model.scaled) is ScaledEmbedding and type(model.gated) is GatedLinear
    assert "GatedLinear replaces Linear's forward" in result.skipped["gated"]
    assert "ScaledEmbedding replaces Embedding's forward" in result.skipped["scaled"]
    with torch.no_grad():
        assert sqnr_db(reference, model(ids)) > 30  # what the subclasses add is still there
