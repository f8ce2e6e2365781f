"""One training loop for every method: only the method's prepare() differs.

    config = TrainConfig(method='tou')          # the 'demo' preset: MiniLM on BBC News, offline, CPU
    record = run(config)                        # trains, evaluates each epoch, merges, writes results/<run id>.json

`run` builds one `Run`, whose `setup` / `fit` / `finish` share one `RunState` (`toukit.runstate`), as a torchtune
recipe does: setup builds the model, its data and the method (a resume restores the state), fit runs the epochs and
their checkpoints, finish evaluates, merges and writes the cost fields from the state. The checkpoint writes the
state and a resume reads it, so a resumed run reports what an uninterrupted one does.

AdamW at a constant learning rate (the TOU paper's setting); validation and test accuracy after every epoch
(choices are made on validation, results reported on test), the training loss every step. The cost fields are
defined in `toukit.meter`. Methods that change the architecture are merged back after training and evaluated again.
"""
import contextlib
import dataclasses
import math
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from safetensors.torch import save_model
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .calibration import first_batches
from .config import PRESETS, TrainConfig, identity, resolve_config, run_source
from .data import (Source, builtin_dataset, dataset_source, format_summary, is_source, load_dataset, num_classes_of,
                   read_source, source_summary)
from .meter import MEMORY_DEFINITIONS, MemoryMeter, timed
from .methods import METHODS, apply_method, count_parameters, has_method_layers, merge
from .models import check_model, create_model, input_modality
from .ranks import DEFAULT_FRACTION
from .results import FINISHED, environment, finished_record, now, redo_path, write_record
from .runstate import (RunLock, RunState, checkpoint_dir, has_checkpoint, load_optimizer, read_checkpoint,
                       remove_checkpoint, restore_model, rng_states, save_checkpoint, set_rng_states,
                       say_checkpoint, sigterm_as_interrupt, sigterm_deferred)
from .step import device_of, evaluate, make_engine, set_seed, to_device, train_step
from .updates import UpdateBaseline

__all__ = ['run', 'Run', 'RecordExistsError', 'preset_model']


class RecordExistsError(FileExistsError):
    """A successful record of the same run exists; pass overwrite=True (or --redo) to replace it."""


def preset_model(preset: str = 'demo', model: Optional[str] = None, pretrained: Optional[bool] = None):
    """(the preset's resolved TOU config, its model with a head for the preset's dataset): the analysis notebooks'
    starting point."""
    config = resolve_config(TrainConfig(method='tou', preset=preset, model=model, pretrained=pretrained))
    net = create_model(config.model, num_classes=config.num_classes(), pretrained=config.pretrained)
    return config, net


class Run:
    """One run: `setup`, `fit` and `finish` over one `RunState`, and the live objects around it (model, data,
    optimizer, engine, memory meter). `record` is the run record, written by `run`."""

    def __init__(self, config: TrainConfig, record: dict, resume: bool = False, progress: bool = True,
                 source: Optional[Source] = None, record_path: Optional[Path] = None, summary: Optional[dict] = None):
        self.config, self.record, self.resume, self.progress, self.source = config, record, resume, progress, source
        self.summary = summary  # your data as read (`toukit.data.source_summary`), for the record
        self.path = config.record_path  # the run's id on disk: its checkpoint and lock
        self.record_path = record_path or self.path  # where its record is written (a redo's goes beside the old one)
        self.device = device_of(config.device)
        self.state = RunState(created=record['run']['created'])
        self.forward = None  # what computes the steps and evaluations when compiled
        self.engine = self.model = self.optimizer = self.memory = self.updates = None

    @property
    def distributed(self) -> bool:
        return self.engine is not None and self.engine.num_processes > 1

    @property
    def main(self) -> bool:
        return self.engine is None or self.engine.is_main_process

    @property
    def net(self) -> nn.Module:
        """What computes the steps and evaluations: the compiled model with compile=True, else the model."""
        return self.model if self.forward is None else self.forward

    @property
    def steps_per_epoch(self) -> int:
        n = len(self.train_loader)
        return n if self.config.max_steps_per_epoch is None else min(n, self.config.max_steps_per_epoch)

    def bare_model(self) -> nn.Module:
        return self.engine.unwrap_model(self.model) if self.distributed else self.model

    # -- setup ------------------------------------------------------------------------------------------------------

    def setup(self) -> 'Run':
        """Build the model, its data and the method; restore a checkpoint's state; open the training-memory window."""
        config = self.config
        self._build_model_and_data()
        self.engine = make_engine(config.device, config.log_with, self.path.parent / 'trackers', config.name,
                                  {k: str(v) for k, v in dataclasses.asdict(config).items()})
        if self.distributed:
            self.device = self.engine.device
        self._make_loaders()
        self.model.to(self.device)
        self._apply_method()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)  # constant lr
        if self.resume:  # everything above is rebuilt deterministically; the checkpoint brings what training changed
            self._restore()
        self.record['metrics'] = self.state.metrics  # one dict: the state's metrics are the record's
        if self.distributed:  # DDP, each process gets its share of every global batch
            self.model, self.optimizer, self.train_loader, *loaders = self.engine.prepare(
                self.model, self.optimizer, self.train_loader, *self.eval_loaders.values())
            self.eval_loaders = dict(zip(self.eval_loaders, loaders))
        self.memory.start_training()  # the model is ready and no optimizer state exists yet
        if self.resume:
            load_optimizer(self.path, self.optimizer)  # inside the window, as an uninterrupted run's first step does
        if config.compile:  # the steps and evaluations run compiled; checkpoints, merge and the record read `model`
            self.forward = torch.compile(self.model)
        return self

    def _build_model_and_data(self) -> None:
        """The model with its new head and the three splits, from the source read once (or the built-in set)."""
        config = self.config
        if self.source is None and is_source(config.dataset):
            self.source = read_source(config.dataset, **config.columns())
        classes = len(self.source.classes) if self.source is not None else num_classes_of(config.dataset)
        set_seed(config.seed)
        self.model = create_model(config.model, classes, pretrained=config.pretrained, weights=config.weights,
                                  seed=config.seed, image_size=config.image_size)
        self.data = load_dataset(config.dataset, self.model, root=config.data_root, split_seed=config.split_seed,
                                 max_length=config.max_length, train_limit=config.train_limit,
                                 val_limit=config.val_limit, test_limit=config.test_limit, download=config.download,
                                 image_size=config.image_size, source=self.source, **config.columns())
        set_seed(config.seed)  # the data's own draws (limits) never shift the seeded stream the run uses

    def _make_loaders(self) -> None:
        # workers are started afresh each epoch (not persistent): a persistent loader draws its workers' base seed
        # from the generator only once, so a resumed run would draw a different data order from epoch 2 on
        config, data = self.config, self.data
        workers = dict(num_workers=config.num_workers, pin_memory=self.device.type == 'cuda')
        self.generator = torch.Generator().manual_seed(config.seed)  # its state at an epoch's start: the data order
        self.train_loader = DataLoader(data.train, batch_size=config.batch_size, shuffle=True,
                                       generator=self.generator, **workers)
        self.eval_loaders = {split: DataLoader(getattr(data, split), batch_size=config.batch_size * 2, **workers)
                             for split in ('val', 'test')}

    def _apply_method(self) -> None:
        """Prepare the model with the method (timed), keep the pretrained baseline, record what is fixed from here."""
        config, model, record = self.config, self.model, self.record
        options = config.method_kwargs()
        if config.calibration_batches:  # the first training batches in file order: the same for every seed
            loader = DataLoader(self.data.train, batch_size=config.batch_size, shuffle=False)
            batches = [to_device(b, self.device) for b in first_batches(loader, config.calibration_batches)]
            whole = METHODS[config.method].data == 'batches'  # LoRA-GA reads the loss: inputs and labels
            options['calibration'] = batches if whole else [inputs for inputs, _ in batches]
        self.memory = MemoryMeter(self.device)
        self.updates = UpdateBaseline.capture(model)
        with timed(self.device) as seconds:  # new layers are built on their weights' device
            apply_method(model, config.method, **options)
        self.updates.capture_start(model, METHODS[config.method].moves_start)
        trainable, total = count_parameters(model)
        record['cost'].update(trainable_params=trainable, total_params=total, factorize_seconds=seconds[0],
                              memory_kind=self.memory.kind, memory_definitions=MEMORY_DEFINITIONS[self.memory.kind],
                              num_workers=config.num_workers)
        data = self.data
        record['data'] = dict(train_size=len(data.train), val_size=len(data.val), test_size=len(data.test),
                              classes=data.classes, **(data.source or dict(source='name', name=config.dataset)))
        if self.summary is not None:
            record['data']['summary'] = self.summary
        record['new_modules'] = list(model.toukit_new_modules)  # the head: trains under every method
        if getattr(model, 'toukit_ranks', None):
            record['ranks'] = dict(model.toukit_ranks)  # a rank pattern: rank=record['ranks'] replays the allocation

    def _restore(self) -> None:
        """The checkpoint's state, trained tensors, data order and RNGs (the optimizer's state comes later)."""
        self.state, tensors = read_checkpoint(self.path, identity(dataclasses.asdict(self.config)))
        restore_model(self.path, self.model, tensors)
        self.state.resumed = self.state.resumed + [dict(at_step=self.state.step, time=now())]
        self.record['run']['created'] = self.state.created
        self.record['resumed'] = self.state.resumed
        self.generator.set_state(self.state.generator)
        set_rng_states(self.state.rng)

    # -- fit --------------------------------------------------------------------------------------------------------

    def fit(self) -> Optional[Dict[str, dict]]:
        """The epochs from the run state's position, each followed by its evaluation, a checkpoint (also every
        `checkpoint_every` steps) and a partial record. Returns the last evaluation (None when the run was resumed
        after its last epoch)."""
        evals = None
        tracker = self.engine if self.config.log_with else None
        try:
            while self.state.epoch <= self.config.epochs:
                losses = self._train_epoch(tracker)
                evals = self._end_epoch(losses, tracker)
        finally:
            self.state.train_memory_mib = max(self.state.train_memory_mib, self.memory.stop_training())
            self.write_costs()
            if tracker:
                tracker.end_training()
        return evals

    def _train_epoch(self, tracker) -> list:
        """The steps of the epoch in progress (from its position after a resume); their losses, those before the
        resume included."""
        config, state = self.config, self.state
        epoch, skip, steps = state.epoch, state.step_in_epoch, self.steps_per_epoch
        self.model.train()
        bar = tqdm(total=steps, initial=skip, desc=f'{config.method} epoch {epoch}/{config.epochs}',
                   disable=not self.progress, leave=False)
        losses = [s['loss'] for s in state.metrics['steps'] if s['epoch'] == epoch]  # those before a resume
        if not skip:
            state.generator = self.generator.get_state()  # the data order of this epoch is drawn from it
        batches = iter(self.train_loader)
        for i in range(steps):
            t_data = time.perf_counter()
            batch = next(batches)
            if i < skip:  # done before the resume: the same order, without training on it again
                if i == skip - 1:  # the RNGs as they were after this batch (a random transform draws from them)
                    set_rng_states(state.rng)
                continue
            inputs, labels = to_device(batch, self.device)
            t_step = time.perf_counter()
            loss = train_step(self.net, self.optimizer, inputs, labels, config.precision,
                              self.engine if self.distributed else None).item()  # .item() waits: the step is done
            losses.append(loss)
            state.epoch_seconds += time.perf_counter() - t_step
            state.epoch_data += t_step - t_data
            state.step, state.step_in_epoch = state.step + 1, i + 1
            if not math.isfinite(loss):
                raise FloatingPointError(f'training loss is {loss} at step {state.step} (epoch {epoch})')
            state.metrics['steps'].append(dict(step=state.step, epoch=epoch, loss=loss))
            if tracker:
                tracker.log(dict(train_loss=loss), step=state.step)
            bar.set_postfix(loss=f'{loss:.4f}')
            bar.update()
            if config.checkpoint_every and state.step % config.checkpoint_every == 0 and i + 1 < steps:
                self.checkpoint()
        del batches
        bar.close()
        return losses

    def _end_epoch(self, losses: list, tracker) -> Dict[str, dict]:
        """The epoch's evaluation and its history row, the checkpoint and the partial record after it."""
        state, metrics = self.state, self.state.metrics
        state.train_seconds += state.epoch_seconds
        state.data_seconds += state.epoch_data
        evals = self.evaluate()
        metrics['epochs'].append(dict(epoch=state.epoch, step=state.step, train_loss=float(np.mean(losses)),
                                      val_loss=evals['val']['loss'], val_accuracy=evals['val']['accuracy'],
                                      test_loss=evals['test']['loss'], test_accuracy=evals['test']['accuracy'],
                                      train_seconds=state.epoch_seconds, data_seconds=state.epoch_data))
        row = metrics['epochs'][-1]
        if tracker:
            tracker.log({f'epoch_{k}': v for k, v in row.items() if k not in ('epoch', 'step')}, step=state.step)
        state.epoch, state.step_in_epoch, state.epoch_seconds, state.epoch_data = state.epoch + 1, 0, 0.0, 0.0
        state.generator = self.generator.get_state()
        self.checkpoint()
        self.write_costs()
        if self.main:
            write_record(self.record, self.record_path)  # a partial record each epoch: a dead run loses one epoch
        if self.progress:
            print(f'epoch {row["epoch"]}: train loss {row["train_loss"]:.4f}  val loss {row["val_loss"]:.4f}  '
                  f'val accuracy {row["val_accuracy"]:.4f}  test accuracy {row["test_accuracy"]:.4f}  '
                  f'({row["train_seconds"]:.1f}s)')
        return evals

    # -- finish -----------------------------------------------------------------------------------------------------

    def finish(self, evals: Optional[Dict[str, dict]]) -> None:
        """The final metrics, the merge back into the original architecture (checked against the last evaluation),
        the update summary, the merged weights, and the cost fields from the run state."""
        config, metrics = self.config, self.state.metrics
        model = self.model = self.bare_model()  # every process holds the same weights: each merges its copy
        if evals is None:  # resumed after the last epoch: evaluate the restored model again (deterministic)
            evals = self.evaluate()
        last = metrics['epochs'][-1]
        final = dict(val_accuracy=last['val_accuracy'], val_loss=last['val_loss'],
                     test_accuracy=last['test_accuracy'], test_loss=last['test_loss'],
                     best_val_accuracy=max(e['val_accuracy'] for e in metrics['epochs']), steps=self.state.step,
                     test_predictions=evals['test']['logits'].argmax(-1).tolist(),
                     test_labels=evals['test']['labels'].tolist(), inference_seconds=evals['test']['seconds'],
                     val_predictions=evals['val']['logits'].argmax(-1).tolist(),  # a paired test between rates
                     val_labels=evals['val']['labels'].tolist(),
                     inference_params=count_parameters(model)[1])
        final.update(self._merge(evals))
        metrics['final'] = final
        if self.main:
            self.record['updates'] = self._update_summary()
        if config.save_weights and self.main:
            if METHODS[config.method].mergeable:
                merge(model)  # a no-op when already merged (or never prepared: ft, bitfit)
            save_model(model, str(self.path.with_suffix('.safetensors')))
        self.write_costs()

    def _merge(self, evals: Dict[str, dict]) -> dict:
        """Merge back into the original architecture and check nothing changed against the last evaluation (eager:
        with compile=True the difference also holds the compiled kernels' rounding); the final fields it sets."""
        method, model = self.config.method, self.model
        if not METHODS[method].mergeable:
            return dict(merge=f'not applicable: {method} adds modules, which stay at inference')
        if not has_method_layers(model):
            return dict(merge='nothing to merge: the architecture never changed')
        merge(model)
        self.forward = None
        merged = self.evaluate()
        return dict(merge='merged', merged_val_accuracy=merged['val']['accuracy'],
                    merged_test_accuracy=merged['test']['accuracy'], merged_params=count_parameters(model)[1],
                    merged_max_abs_logit_diff=max(float((merged[k]['logits'] - evals[k]['logits']).abs().max())
                                                  for k in merged),
                    inference_seconds=merged['test']['seconds'], inference_params=count_parameters(model)[1])

    def _update_summary(self) -> dict:
        """What the run did to each layer (`toukit.updates`), measured at the run's TOU ranks or the preset's."""
        ranks = self.record.get('ranks')
        preset_rank = PRESETS[self.config.preset].get('ranks', {}).get('tou', DEFAULT_FRACTION)
        try:
            return self.updates.summary(self.model, self.config.method, ranks, preset_rank)
        except Exception as e:  # noqa: BLE001 - an analysis never fails a finished run; the record says why
            return dict(note=f'not computed: {type(e).__name__}: {e}')

    # -- the state ----------------------------------------------------------------------------------------------------

    def measure(self) -> None:
        """The memory meter's readings so far into the run state (which keeps the maximum over every segment)."""
        self.state.train_memory_mib = max(self.state.train_memory_mib, self.memory.train_mib())
        self.state.peak_memory_mib = max(self.state.peak_memory_mib, self.memory.peak_mib())

    def write_costs(self) -> None:
        """The record's cost fields, from the run state: the same definitions whether or not the run was resumed."""
        self.state.peak_memory_mib = max(self.state.peak_memory_mib, self.memory.peak_mib())
        self.record['cost'].update(self.state.cost_fields())

    def checkpoint(self) -> None:
        """Save the run state (with the data order and RNGs as they are now) and what training changed."""
        self.state.rng = rng_states()
        self.measure()
        if self.main:
            save_checkpoint(self.path, self.bare_model(), self.optimizer, self.state,
                            identity(dataclasses.asdict(self.config)))

    def evaluate(self) -> Dict[str, dict]:
        return {split: evaluate(self.net, loader, self.device, self.config.precision, self.engine)
                for split, loader in self.eval_loaders.items()}


def _check_inputs(config: TrainConfig, source: Optional[Source], resume: bool) -> Optional[dict]:
    """Every input a run reads, checked before it writes anything (no record, no lock): the batch against the
    processes, the model's files, the data against the model, the checkpoint to resume; returns your data's summary
    (`toukit.data.source_summary`), None for a built-in set.

    Raises:
        ValueError: naming the field, the file and what is wrong.
    """
    world = int(os.environ.get('WORLD_SIZE', '1'))  # under torchrun / accelerate launch: the processes
    if config.batch_size % world:
        raise ValueError(f'batch_size={config.batch_size} does not split over {world} processes: the global batch '
                         f'must be a multiple of the world size')
    check_model(config.model, config.weights)
    takes = input_modality(config.model)
    if source is not None:
        kind = {'table': 'text', 'image_folder': 'image'}.get(source.origin)  # a torch Dataset fits any model
    else:
        builtin = builtin_dataset(config.dataset)
        kind = builtin.modality if builtin is not None else None
    if kind in ('text', 'image') and kind != takes:
        raise ValueError(f'dataset={config.dataset!r}: {kind} data, but model={config.model!r} takes {takes} input')
    if resume and not has_checkpoint(config.record_path):
        raise ValueError(f'resume=True but {config.name} has no checkpoint ({checkpoint_dir(config.record_path)}); '
                         f'run it without resume')
    return source_summary(source, config.split_seed) if source is not None else None


def _write_final(record: dict, path: Path, out: Path) -> None:
    """The run's last record, whole (SIGTERM held back): a redo's replaces the old record only when it ends ok; a
    finished run's checkpoint is removed after its record is written, never before."""
    with sigterm_deferred():
        write_record(record, out)
        if record['status'] == 'ok':
            if out != path:
                os.replace(out, path)  # atomic: a reader sees the old record or the new, never a partial one
            redo_path(path).unlink(missing_ok=True)  # a failed redo's leftover, now superseded
        if record['status'] in FINISHED:
            remove_checkpoint(path)


def run(config: Optional[TrainConfig] = None, progress: bool = True, overwrite: bool = False, resume: bool = False,
        data=None, **overrides) -> dict:
    """Fine-tune one model with one method and write its run record; returns the record.

    The record goes to `results_dir/<run id>.json`, the id built from every config field that changes the result
    (`toukit.config.run_id`), so runs that differ in any of them never share a file. A run that raises leaves a
    record with status 'failed', the error and the history so far. The run checkpoints after every epoch (and
    every `checkpoint_every` steps) into `results_dir/<run id>.ckpt/` (`toukit.runstate`), deleted on success,
    and holds the lock `<run id>.lock` while it runs.

    Args:
        resume: continue from the run's checkpoint (after a kill, a crash or a failure); on the CPU the result is
            bitwise the one an uninterrupted run gives.
        data: a map-style torch Dataset of (input, label) pairs to train on instead of `config.dataset` (split like
            the built-in sets; its items' inputs are what the model takes: a tensor, or a dict of tensors). It is
            read once and named by its content ('python:<class>:<hash>') in the run's id.

    Raises:
        RecordExistsError: a successful record of this run exists and `overwrite` is False (nothing is written).
        RunLockedError: another live process runs the same run.
        ValueError: resume without a checkpoint, or with one made by a different configuration.
    """
    source = dataset_source(data) if data is not None else run_source(config, **overrides)
    if data is not None:
        overrides['dataset'] = source.name
    config = resolve_config(config, source=source, **overrides)
    path = config.record_path
    main = int(os.environ.get('RANK', '0')) == 0  # under torchrun / accelerate launch only rank 0 writes
    summary = _check_inputs(config, source, resume)
    if summary is not None and main:
        print(format_summary(summary))  # said back as read, before any training
    with (RunLock(path) if main else contextlib.nullcontext()), sigterm_as_interrupt():
        finished = finished_record(path) is not None  # checked under the lock: no race with its owner
        if finished and not overwrite:
            raise RecordExistsError(f'{path}: a finished record of this run exists; pass overwrite=True '
                                    f'(toukit: --redo) to run it again and replace it')
        if main and not resume:
            say_checkpoint(config.name, path, finished)
        out = redo_path(path) if finished else path  # a redo replaces the finished record only once it ends ok
        record = dict(run=dict(id=config.name, created=now(), config=dataclasses.asdict(config)), status='running',
                      metrics=dict(epochs=[], steps=[], final={}), cost={},
                      env=dict(environment(str(device_of(config.device))), pid=os.getpid(), host=socket.gethostname()))
        try:
            job = Run(config, record, resume, progress and main, source, out, summary).setup()
            job.finish(job.fit())
            record['status'] = 'ok'
        except FloatingPointError as e:  # diverged: a result of this learning rate, final like a success
            record['status'] = 'diverged'
            record['error'] = str(e)
            raise
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the checkpoint stays for a resume
            record['status'] = 'interrupted'
            record['error'] = f'interrupted ({e or "KeyboardInterrupt"})'
            raise
        except BaseException as e:
            record['status'] = 'failed'
            record['error'] = ''.join(traceback.format_exception_only(type(e), e)).strip()
            record['traceback'] = traceback.format_exc()
            raise
        finally:
            record['finished'] = now()
            if main:
                _write_final(record, path, out)
    return record
