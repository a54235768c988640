"""The tools users train with, at their default checkpointing: Trainer and TRL resume, accelerate, plain loads."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

import rso  # noqa: E402
from conftest import tiny_bert  # noqa: E402
from rso.train.best import live_tensors as held_tensors  # noqa: E402

TAU = 3


def micro_llama(vocab=64, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False))


class Blocks(torch.utils.data.Dataset):
    def __init__(self, n=48, seq=16, vocab=64):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(3))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def states_close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def live_tensors(model):
    """A copy of the parameters and buffers as they are now (``rso.train.best.live_tensors``; ``state_dict()`` would
    first merge B into W₀)."""
    return {k: v.detach().clone() for k, v in held_tensors(model).items()}


def trainer_args(out, **kw):
    # Trainer defaults otherwise: save_strategy="steps", safetensors, AdamW, linear schedule
    return TrainingArguments(output_dir=str(out), max_steps=8, save_steps=4, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, weight_decay=0.01, report_to=[],
                             use_cpu=True, seed=0, logging_steps=100, disable_tqdm=True, **kw)


@pytest.mark.parametrize("projection", ["stiefel", "svd"])
def test_trainer_checkpoints_and_resume_equal_the_uninterrupted_run(tmp_path, projection):
    full = rso.wrap(micro_llama(), rank=8, tau=TAU, projection=projection)
    Trainer(model=full, args=trainer_args(tmp_path / "full"), train_dataset=Blocks()).train()
    assert rso.state(full)["step"] == 8 and rso.state(full)["cycle"] == 8 // TAU
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()

    resumed = rso.wrap(micro_llama(seed=1), rank=8, tau=TAU, projection=projection)  # other init: all from disk
    Trainer(model=resumed, args=trainer_args(tmp_path / "resumed"), train_dataset=Blocks()).train(
        resume_from_checkpoint=str(checkpoint))
    assert rso.state(resumed) == rso.state(full)
    states_close(resumed.state_dict(), full.state_dict())

    # the checkpoint folder is an ordinary HF model: the plain class loads the trained (effective) weights
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "full" / "checkpoint-8")
    ids = Blocks().ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, full(input_ids=ids).logits)
    again = rso.from_pretrained(LlamaForCausalLM, tmp_path / "full" / "checkpoint-8")
    assert rso.state(again) == rso.state(full)


class Labeled(torch.utils.data.Dataset):
    def __init__(self, n=48, seq=12, vocab=64):
        generator = torch.Generator().manual_seed(4)
        self.ids = torch.randint(1, vocab, (n, seq), generator=generator)
        self.labels = torch.randint(0, 2, (n,), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_trainer_on_a_sequence_classifier_resumes_and_its_checkpoint_loads_plainly(tmp_path):
    """The GLUE-style flow: an encoder with a classification head (its pooler wrapped, the head trained in full)
    under Trainer's default checkpoints; resume equals the uninterrupted run, and the checkpoint folder loads with
    the plain Auto class (the trained weights) and with ``rso.from_pretrained`` (the wrapped model)."""
    from transformers import AutoModelForSequenceClassification

    full = rso.wrap(tiny_bert(), rank=8, tau=TAU)
    Trainer(model=full, args=trainer_args(tmp_path / "full"), train_dataset=Labeled()).train()
    assert rso.state(full)["step"] == 8 and "bert.pooler.dense" in dict(rso.subspace_layers(full))
    resumed = rso.wrap(tiny_bert(seed=1), rank=8, tau=TAU)
    Trainer(model=resumed, args=trainer_args(tmp_path / "resumed"), train_dataset=Labeled()).train(
        resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert rso.state(resumed) == rso.state(full)
    states_close(resumed.state_dict(), full.state_dict())

    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "full" / "checkpoint-8").eval()
    again = rso.from_pretrained(AutoModelForSequenceClassification, tmp_path / "full" / "checkpoint-8").eval()
    assert rso.state(again) == rso.state(full)
    ids = Labeled().ids[:4]
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, full.eval()(input_ids=ids).logits)
        torch.testing.assert_close(again(input_ids=ids).logits, full(input_ids=ids).logits)


def test_trainer_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    """Trainer's ``load_best_model_at_end``: the model ends as its best checkpoint, weights and rso counters alike.
    The metric is chosen so that the best is the earlier checkpoint (step 4 of 8), so loading it changes the model."""
    model = rso.wrap(micro_llama(), rank=8, tau=TAU)
    args = trainer_args(tmp_path, eval_strategy="steps", eval_steps=4, load_best_model_at_end=True,
                        metric_for_best_model="loss", greater_is_better=True)
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(), eval_dataset=Blocks(n=8))
    trainer.train()
    losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(losses) == 2 and losses[0] > losses[1]
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-4")
    best = rso.from_pretrained(LlamaForCausalLM, tmp_path / "checkpoint-4")
    assert rso.state(model) == rso.state(best) and rso.state(model)["step"] == 4
    states_close(model.state_dict(), best.state_dict(), atol=0)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(losses[0], rel=1e-6)


def test_trl_sft_trainer_checkpoints_and_resumes(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from rso.train.data import load_documents, load_tokenizer
    tok = load_tokenizer("gpt2")
    tok.pad_token = tok.eos_token
    docs = load_documents("xsum", eval_fraction=0.0, max_docs=24)[0]
    data = Dataset.from_dict({"text": [d[:200] for d in docs]})

    def sft(out, model):
        cfg = trl.SFTConfig(output_dir=str(out), max_steps=6, save_steps=3, per_device_train_batch_size=4,
                            gradient_accumulation_steps=2, learning_rate=5e-3, max_length=32, report_to=[],
                            use_cpu=True, seed=0, logging_steps=100, disable_tqdm=True)
        return trl.SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)

    full = rso.wrap(micro_llama(vocab=len(tok)), rank=8, tau=TAU)
    sft(tmp_path / "full", full).train()
    resumed = rso.wrap(micro_llama(vocab=len(tok), seed=1), rank=8, tau=TAU)
    sft(tmp_path / "resumed", resumed).train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert rso.state(resumed) == rso.state(full) and rso.state(full)["step"] == 6
    states_close(resumed.state_dict(), full.state_dict())
    # SFTConfig turns on bf16 autocast (patched into full.forward by accelerate): compare weights, not logits
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "full" / "checkpoint-6")
    layers = dict(rso.subspace_layers(full))
    for key, value in plain.state_dict().items():
        name = key.removesuffix(".weight")
        expected = layers[name].effective_weight() if name in layers else full.state_dict()[key]
        assert torch.equal(value, expected), key


def test_accelerate_save_state_and_load_state_resume_exactly(tmp_path):
    from accelerate import Accelerator

    def session(model):
        acc = Accelerator(cpu=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return acc, *acc.prepare(model, opt)

    data = Blocks()
    def steps(model, opt, acc, start, n):
        for i in range(start, start + n):
            batch = data[i]
            loss = model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss
            acc.backward(loss)
            opt.step()
            opt.zero_grad()

    acc, model, opt = session(rso.wrap(micro_llama(), rank=8, tau=TAU))
    steps(model, opt, acc, 0, 4)
    acc.save_state(str(tmp_path / "state"))  # safetensors by default
    steps(model, opt, acc, 4, 4)

    acc2, other, opt2 = session(rso.wrap(micro_llama(seed=1), rank=8, tau=TAU))
    acc2.load_state(str(tmp_path / "state"))
    assert rso.state(other)["step"] == 4
    steps(other, opt2, acc2, 4, 4)
    assert rso.state(other) == rso.state(model)
    states_close(other.state_dict(), model.state_dict(), atol=0)


@pytest.mark.parametrize("projection", ["stiefel", "svd"])
def test_a_deep_copy_trains_on_its_own(projection):
    """``copy.deepcopy`` of a wrapped model (TRL's reference models, EMA copies) carries its own outer loop: training
    the copy across merges leaves the original untouched, the copy's shared P is its own, and the original trained
    the same way from the same point ends bit for bit where the copy did."""
    import copy

    def steps(model, start, n):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for i in range(start, start + n):
            batch = Blocks()[i]
            model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
            opt.step()
            opt.zero_grad()

    model = rso.wrap(micro_llama(), rank=8, tau=TAU, projection=projection)
    steps(model, 0, 2)
    before = live_tensors(model)
    twin = copy.deepcopy(model)
    steps(twin, 2, 2 * TAU + 1)  # two merges in the copy
    assert rso.state(model)["step"] == 2 and rso.state(twin)["cycle"] == 3
    states_close(live_tensors(model), before, atol=0)
    mine, its = dict(rso.subspace_layers(model)), dict(rso.subspace_layers(twin))
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert its[q].P.data_ptr() == its[k].P.data_ptr() != mine[q].P.data_ptr()
    steps(model, 2, 2 * TAU + 1)
    assert rso.state(model) == rso.state(twin)
    states_close(model.state_dict(), twin.state_dict(), atol=0)


@pytest.mark.parametrize("chunked_head", [None, 4])
def test_generate_mid_cycle_equals_the_unwrapped_model_and_changes_nothing(chunked_head):
    """``generate`` (KV cache on and off) between training steps, with B ≠ 0 in the middle of a cycle: the scores
    are the merged model's, and the wrapped model's state (B, P, counters) is as before."""
    import copy

    model = rso.wrap(micro_llama(), rank=8, tau=TAU, chunked_head=chunked_head)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(TAU + 1):  # one merge, then one step into the next cycle
        batch = Blocks()[i]
        model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(layer.B.abs().sum() > 0 for _, layer in rso.subspace_layers(model))
    plain = rso.unwrap(copy.deepcopy(model)).eval()
    model.eval()
    before, state = live_tensors(model), rso.state(model)
    prompt = Blocks().ids[10:12, :5]
    with torch.no_grad():
        want = plain.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                              return_dict_in_generate=True)
        for use_cache in (True, False):
            got = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                                 return_dict_in_generate=True, use_cache=use_cache)
            assert torch.equal(got.sequences, want.sequences)
            torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores))
    assert rso.state(model) == state
    states_close(live_tensors(model), before, atol=0)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps its state in process-wide singletons; an earlier SFTTrainer leaves bf16 autocast there."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("projection", ["stiefel", "svd"])
def test_accelerate_gradient_accumulation_counts_optimizer_steps(projection, fresh_accelerate_state):
    """``accelerator.accumulate`` with 2 micro-batches per step (``optimizer.step()`` called on every micro-batch, as
    accelerate's docs write it) equals a hand-written accumulation loop: the outer loop counts the real optimizer
    steps, merges at the same ones and, for SVD, takes the subspace from the gradient of both micro-batches."""
    from accelerate import Accelerator

    data = Blocks()
    models = []
    for use_accelerate in (True, False):
        model = rso.wrap(micro_llama(), rank=8, tau=TAU, projection=projection)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        if use_accelerate:
            acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
            model, opt = acc.prepare(model, opt)
        for i in range(4 * TAU):
            batch = data[i]
            if use_accelerate:
                with acc.accumulate(model):
                    acc.backward(model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss)
                    opt.step()
                    opt.zero_grad()
            else:
                (model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss / 2).backward()
                if i % 2 == 1:
                    opt.step()
                    opt.zero_grad()
        models.append(model)
    assert rso.state(models[0]) == rso.state(models[1]) and rso.state(models[0])["step"] == 2 * TAU
    states_close(models[0].state_dict(), models[1].state_dict())


def test_gradient_checkpointing_with_default_arguments_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = rso.wrap(micro_llama(), rank=8, tau=None)
        with torch.no_grad():
            for _, layer in rso.subspace_layers(model):
                layer.B.normal_(std=0.1)
        if checkpointing:
            model.gradient_checkpointing_enable()  # HF default arguments
            assert model.is_gradient_checkpointing
        model.train()
        batch = Blocks()[0]
        model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
        grads.append([layer.B.grad.clone() for _, layer in rso.subspace_layers(model)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
