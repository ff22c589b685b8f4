"""
Mutation testing: apply small, plausible bugs to model.py, train.py and the scripts, one at a time, in a scratch copy
of the repo; run the tests that ought to catch each; report which survive.

    python tools/mutate.py                    # every mutation; writes results/mutation/report.md
    python tools/mutate.py --only no_clip,lr_constant
    python tools/mutate.py --list             # names, files and bugs, nothing run
    python tools/mutate.py --full             # the whole suite against each mutant (about 2 min each on 2 cores)

A curated list of the bugs that matter (those found in review, and others of the same kind), not a tool's
exhaustive operator mutants: mutmut's hundreds of mutants of model.py and train.py, each against a suite of a minute
or two, would take hours on 2 cores. A mutation whose `before` text is no longer in its file is reported as stale:
update it when the code moves. Exit status 0 when every mutant is caught, 1 otherwise. The working tree is never
modified.
"""

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # tools/ sits in the repo root
PT = "tests/test_promises_train.py"
PM = "tests/test_promises_model.py"
SCHEDULE = f"{PT}::test_learning_rate_schedule_values"
OPTIMIZER_STEPS = f"{PT}::test_first_and_resumed_optimizer_steps_redone_by_hand"
COUNTERS = f"{PT}::test_always_save_checkpoint_and_counters_carried_through_resume"
UINT32 = "tests/test_promises_data.py::test_vocabulary_above_65536_is_stored_as_uint32"
TS = "tests/test_train_speed.py"
SF = "tests/test_stopping_and_failures.py"
SECOND_SIGNAL = f"{SF}::test_a_second_stop_signal_changes_nothing"
PREPARE_SIGNALS = f"{SF}::test_prepare_stopped_by_signals_leaves_nothing_and_says_so_in_one_line"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    bug: str  # what the mutant does wrong, in words
    before: str  # exact text, found once in file
    after: str
    tests: tuple[str, ...]  # pytest node ids or files that should fail


MUTATIONS = [
    # ---- learning-rate schedule and optimizer step
    Mutation("lr_constant", "train.py", "constant learning rate (no warmup, no decay)",
             "    if not config.decay_lr:\n", "    if True:\n",
             (SCHEDULE, OPTIMIZER_STEPS)),
    Mutation("lr_no_warmup", "train.py", "no warmup: the cosine starts at iter 0",
             "    if it < config.warmup_iters:\n", "    if False:\n",
             (SCHEDULE, OPTIMIZER_STEPS)),
    Mutation("lr_no_floor", "train.py", "after lr_decay_iters the cosine goes on instead of holding min_lr",
             "    if it > config.lr_decay_iters:\n", "    if False:\n",
             (SCHEDULE,)),
    Mutation("lr_cosine_to_zero", "train.py", "the cosine decays the full learning rate, ignoring min_lr's share",
             "(config.learning_rate - config.min_lr)", "config.learning_rate",
             (SCHEDULE,)),
    Mutation("lr_not_applied", "train.py", "the schedule is computed but the optimizer keeps the peak rate",
             "set_learning_rate(run.optimizer, lr)", "set_learning_rate(run.optimizer, config.learning_rate)",
             (OPTIMIZER_STEPS,)),
    Mutation("lr_warmup_off_by_one", "train.py", "warmup starts at a learning rate of 0",
             "config.learning_rate * (it + 1) / (config.warmup_iters + 1)",
             "config.learning_rate * it / config.warmup_iters",
             (SCHEDULE,)),
    Mutation("default_no_warmup", "train.py", "TrainConfig's default warmup is 0 (the GPU configs rely on it)",
             "warmup_iters: int = 2000", "warmup_iters: int = 0",
             (f"{PT}::test_gpu_configs_train_with_nanogpts_schedule_and_the_default_sla",)),
    Mutation("default_no_clip", "train.py", "TrainConfig's default grad_clip is 0: no clipping in the GPU configs",
             "grad_clip: float = 1.0", "grad_clip: float = 0.0",
             (f"{PT}::test_gpu_configs_train_with_nanogpts_schedule_and_the_default_sla",)),
    Mutation("betas_swapped", "train.py", "AdamW's betas passed the wrong way round",
             "betas = (config.beta1, config.beta2)", "betas = (config.beta2, config.beta1)",
             (OPTIMIZER_STEPS,)),
    Mutation("weight_decay_setting_ignored", "train.py", "--weight_decay ignored (always 0.1)",
             "            config.weight_decay, config.learning_rate, betas,",
             "            0.1, config.learning_rate, betas,",
             (OPTIMIZER_STEPS,)),
    Mutation("clip_value_ignored", "train.py", "gradients clipped at 1.0 whatever grad_clip says",
             "clip_grad_norm_(model.parameters(), grad_clip)",
             "clip_grad_norm_(model.parameters(), 1.0)",
             (f"{PT}::test_gradient_clipping_scales_the_applied_gradient_to_grad_clip",)),
    Mutation("no_clip", "train.py", "gradient clipping skipped",
             "        if grad_clip > 0:", "        if False:",
             (f"{PT}::test_gradient_clipping_scales_the_applied_gradient_to_grad_clip",)),
    Mutation("loss_not_divided", "train.py", "the loss is not divided by the number of micro-steps",
             "scaler.scale(loss / micro_steps).backward()", "scaler.scale(loss).backward()",
             (OPTIMIZER_STEPS,)),
    Mutation("decay_on_all", "model.py", "weight decay on biases and LayerNorm gains too",
             'p.dim() < 2], "weight_decay": 0.0}', 'p.dim() < 2], "weight_decay": weight_decay}',
             (OPTIMIZER_STEPS,)),
    Mutation("decay_on_none", "model.py", "no weight decay on matrices",
             'p.dim() >= 2], "weight_decay": weight_decay}', 'p.dim() >= 2], "weight_decay": 0.0}',
             (OPTIMIZER_STEPS,)),
    Mutation("windows_not_by_micro_step", "train.py", "every micro-step of a step draws the same windows",
             "np.random.default_rng((config.seed, it, micro_step))", "np.random.default_rng((config.seed, it))",
             (OPTIMIZER_STEPS,)),
    # ---- resume, checkpoints, signals
    Mutation("optimizer_not_restored", "train.py", "resume starts AdamW afresh",
             '    run.optimizer.load_state_dict(with_kernels_of(run.optimizer, checkpoint["optimizer"]))\n', "",
             (OPTIMIZER_STEPS,)),
    Mutation("best_val_loss_not_restored", "train.py", "resume forgets best_val_loss",
             'progress.best_val_loss = checkpoint["best_val_loss"]',
             "progress.best_val_loss = math.inf",
             (COUNTERS,)),
    Mutation("tokens_seen_not_restored", "train.py", "resume restarts the token counter at 0",
             'progress.tokens_seen = checkpoint["tokens_seen"]', "progress.tokens_seen = 0",
             (COUNTERS,
              OPTIMIZER_STEPS)),
    Mutation("rng_not_restored", "train.py", "resume does not restore the RNG states (dropout differs)",
             "        set_rng_state(saved_rng[run.rank])\n", "        pass\n",
             ("tests/test_train.py::test_resume_continues_exactly",)),
    Mutation("resume_keeps_log_lines", "train.py", "resume keeps log lines written after the last checkpoint",
             "if logged_iter <= iter_num:", "if True:",
             (f"{PT}::test_resume_drops_log_lines_after_the_checkpoint",)),
    Mutation("log_trim_off_by_one", "train.py", "resume also drops the lines of the checkpoint's own step",
             "if logged_iter <= iter_num:", "if logged_iter < iter_num:",
             (f"{PT}::test_resume_drops_log_lines_after_the_checkpoint",)),
    Mutation("checkpoint_not_atomic", "checkpoint.py", "the checkpoint is written to ckpt.pt, no temp + rename",
             'temp_path = f"{path}.{os.getpid()}.tmp"', "temp_path = path",
             (f"{PT}::test_checkpoint_write_is_atomic",)),
    Mutation("run_saves_in_place", "train.py", "the training loop writes ckpt.pt itself, in place",
             "save_checkpoint(training_state(run, progress, rng), run.ckpt_path)",
             "torch.save(training_state(run, progress, rng), run.ckpt_path)",
             (f"{PT}::test_checkpoint_write_is_atomic",)),
    Mutation("always_save_ignored_saves", "train.py", "always_save_checkpoint ignored: saves at every evaluation",
             "if improved or config.always_save_checkpoint or finished or stop:", "if True:",
             (COUNTERS,)),
    Mutation("always_save_ignored_skips", "train.py", "always_save_checkpoint ignored: saves only on improvement",
             "if improved or config.always_save_checkpoint or finished or stop:", "if improved or finished or stop:",
             (COUNTERS,)),
    Mutation("sigint_not_handled", "train.py", "SIGINT is not caught (only SIGTERM saves and exits 0)",
             "STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)", "STOP_SIGNALS = (signal.SIGTERM,)",
             (f"{PT}::test_sigint_saves_and_exits_zero",)),
    Mutation("sigterm_not_handled", "train.py", "SIGTERM is not caught (only SIGINT)",
             "STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)", "STOP_SIGNALS = (signal.SIGINT,)",
             ("tests/test_train.py::test_sigterm_saves_and_resumes_to_the_same_losses",)),
    Mutation("divisibility_unchecked", "train.py", "gradient_accumulation_steps not checked against the world size",
             "if config.gradient_accumulation_steps % world_size:", "if False:",
             (f"{PT}::test_ddp_gradient_accumulation_must_divide_among_processes",)),
    Mutation("every_rank_logs", "train.py", "every DDP rank writes log.jsonl, not rank 0 alone",
             "    config, log_path, wandb_run = run.config, None, None\n    if run.master:",
             "    config, log_path, wandb_run = run.config, None, None\n    if True:",
             ("tests/test_train.py::test_ddp_two_processes_match_one_with_same_global_batch",)),
    Mutation("dist_nn_imported_late", "train.py",
             "torch.distributed.nn is imported by DDP after the group exists: its defaults hold the group forever",
             "import torch.distributed.nn\n", "\n",
             ("tests/test_train.py::test_ddp_teardown_joins_gloo_threads_in_destroy_process_group",)),
    Mutation("ddp_wrapper_kept_at_teardown", "train.py",
             "the DDP wrapper still holds the group at destroy_process_group: gloo's threads live on past it",
             "        run.train_model = run.model  #", "        pass  #",
             ("tests/test_train.py::test_ddp_teardown_joins_gloo_threads_in_destroy_process_group",)),
    # ---- stop signals, the out_dir lock, one-line errors
    Mutation("stop_handler_restored_after_first_signal", "train.py", "the stop handler steps aside after the first "
             "signal: a second SIGTERM or Ctrl-C kills the run before or while it saves",
             "        already_stopping, self.requested = self.requested, True\n",
             "        already_stopping, self.requested = self.requested, True\n"
             "        signal.signal(signum, signal.SIG_DFL)\n",
             (SECOND_SIGNAL, f"{SF}::test_sigterm_to_the_process_group_of_timeout_saves_and_exits_0")),
    Mutation("stop_handler_takes_a_lock", "train.py", "the stop handler sets its flag under a lock (as "
             "threading.Event.set() does): a second signal that lands while the first handler holds it hangs the run",
             "        already_stopping, self.requested = self.requested, True\n",
             "        self.__dict__.setdefault('lock', __import__('threading').Lock())\n"
             "        with self.lock:\n"
             "            already_stopping, self.requested = self.requested, True\n",
             (f"{SF}::test_a_second_signal_inside_the_stop_handler_does_not_hang_it",)),
    Mutation("stop_signals_killed_after_main", "train.py", "the command line leaves its handler to the interpreter's "
             "shutdown, which restores the default action: a late second signal kills a run that has saved",
             "        for sig in STOP_SIGNALS:\n            signal.signal(sig, signal.SIG_IGN)\n",
             "        pass\n",
             (SECOND_SIGNAL, f"{SF}::test_sigterm_to_the_process_group_of_timeout_saves_and_exits_0")),
    Mutation("stop_handler_before_process_group", "train.py", "the stop handler is installed from the start: a "
             "worker waiting in init_process_group ignores torchrun's SIGTERM after a peer failed (30 s to SIGKILL)",
             "        signal.signal(sig, signal.SIG_DFL)\n    config, explicit_keys",
             "        signal.signal(sig, StopRequest(0))\n    config, explicit_keys",
             (f"{SF}::test_a_worker_waiting_for_its_peers_stops_at_once",)),
    Mutation("stop_not_checked_after_evaluation", "train.py", "a stop asked during an evaluation saves after it and "
             "again a step later",
             "            stop = stop or stop_agreed(run, stop_requested)  #", "            pass  #",
             (f"{SF}::test_a_stop_during_an_evaluation_saves_once",)),
    Mutation("no_out_dir_lock", "train.py", "out_dir is not locked: two runs write one log and one checkpoint",
             "        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n", "        pass\n",
             (f"{SF}::test_two_runs_started_at_once_on_one_out_dir_one_is_refused",
              f"{SF}::test_a_running_run_refuses_a_resume_and_an_evaluation")),
    Mutation("log_without_checkpoint_is_a_run", "train.py", "an out_dir whose run saved no checkpoint still refuses a "
             "fresh run (the early-death trap)",
             "    if fresh and os.path.exists(ckpt_path):",
             "    if fresh and (os.path.exists(ckpt_path) or os.path.exists(log_path)):",
             (f"{SF}::test_a_run_that_ended_before_its_first_save_leaves_no_lock_and_no_run",)),
    Mutation("eval_only_into_a_run", "train.py", "--eval_only without resume evaluates a new model into a run's log",
             "    if fresh and os.path.exists(ckpt_path):",
             "    if fresh and not config.eval_only and os.path.exists(ckpt_path):",
             (f"{SF}::test_eval_only_without_resume_on_a_run_is_refused",)),
    Mutation("failed_run_leaves_its_out_dir", "train.py", "a run that fails before writing leaves the out_dir it made",
             "        if created and os.listdir(out_dir) == [LOCK_FILE]:", "        if False:",
             (f"{SF}::test_bad_settings_are_one_config_error_line_with_status_2",)),
    Mutation("wandb_error_as_traceback", "train.py", "wandb's own errors (no API key) reach the user as tracebacks",
             "    except Exception as err:  # e.g. UsageError", "    except ImportError as err:  # e.g. UsageError",
             (f"{SF}::test_wandb_without_a_login_is_one_error_line_and_leaves_no_out_dir",)),
    Mutation("seed_unchecked", "train.py", "a seed numpy cannot take passes the config checks",
             "        if not 0 <= self.seed < 2**31:", "        if False:",
             (f"{SF}::test_bad_settings_are_one_config_error_line_with_status_2",)),
    Mutation("infinite_values_pass", "train.py", "--learning_rate=inf and other infinite values pass the config checks",
             "            if isinstance(value, float) and not math.isfinite(value):", "            if False:",
             (f"{SF}::test_bad_settings_are_one_config_error_line_with_status_2",)),
    Mutation("config_error_exits_1", "train.py", "a config error found once the model is built exits 1, not 2",
             "        print(f\"error: {err}\", file=sys.stderr)\n        return 2\n",
             "        print(f\"error: {err}\", file=sys.stderr)\n        return 1\n",
             (f"{SF}::test_bad_settings_are_one_config_error_line_with_status_2",)),
    Mutation("hub_retried_offline", "checkpoint.py", "GPT-2 weights not in the cache are fetched from an unreachable "
             "Hub with huggingface_hub's half a minute of retries",
             "            check_hub_reachable(name_or_dir)\n", "",
             (f"{SF}::test_gpt2_weights_offline_fail_at_once_unless_cached",)),
    Mutation("hub_before_cache", "checkpoint.py", "GPT-2 weights are asked of the Hub before the cache: cached weights "
             "need the network",
             "                return GPT.from_pretrained(name_or_dir, local_files_only=True, **overrides)\n",
             "                raise OSError\n",
             (f"{SF}::test_gpt2_weights_offline_fail_at_once_unless_cached",)),
    Mutation("prepare_cleanup_not_shielded", "prepare_openwebtext.py", "a second signal interrupts prepare's cleanup "
             "(a temporary file and the out_dir left) or kills it once done",
             "    if signal.getsignal(signal.SIGTERM) is stop:", "    if False:",
             (PREPARE_SIGNALS,)),
    Mutation("prepare_stop_leaves_bars_open", "prepare_openwebtext.py", "a stop that lands as a progress bar "
             "closes leaves it open: Python closes it at exit and its last state prints under the interrupted line",
             "        for bar in list(tqdm._instances):\n            bar.close()\n", "",
             (f"{SF}::test_prepare_stopped_as_a_progress_bar_closes_still_ends_on_its_one_line",)),
    Mutation("prepare_full_disk_traceback", "prepare_openwebtext.py", "a full disk in prepare is an OSError traceback",
             "    except OSError as e:  # a full disk", "    except ZeroDivisionError as e:  # a full disk",
             (f"{SF}::test_prepare_on_a_full_disk_is_one_error_line",)),
    # ---- logging
    Mutation("log_interval_ignored", "train.py", "a train line every step whatever log_interval says",
             "if log_due and run.master:", "if run.master:",
             (f"{PT}::test_log_interval_and_the_logged_rates",)),
    Mutation("ms_per_step_not_per_step", "train.py", "ms_per_step is the time since the last line, not per step",
             "seconds_per_step = (now - self.time) / (iter_num - self.iter_num)", "seconds_per_step = now - self.time",
             (f"{PT}::test_log_interval_and_the_logged_rates",)),
    Mutation("lr_logged_wrong", "train.py", "the log shows the peak learning rate, not the step's",
             '"lr": lr,', '"lr": config.learning_rate,',
             (f"{PT}::test_log_interval_and_the_logged_rates", "tests/test_train.py::test_tiny_model_learns")),
    Mutation("tokens_per_iter_without_accumulation", "train.py", "tokens per step forget the micro-steps",
             "return self.config.gradient_accumulation_steps * self.config.batch_size * self.config.block_size",
             "return self.config.batch_size * self.config.block_size",
             (f"{PT}::test_log_interval_and_the_logged_rates",)),
    Mutation("wandb_drops_lr", "train.py", "wandb is not sent the learning rate",
             'NOT_NUMBERS = ("iter", "config", "model_args", "provenance")',
             'NOT_NUMBERS = ("iter", "config", "model_args", "provenance", "lr")',
             ("tests/test_train.py::test_wandb_offline_run_logs_the_same_metrics",)),
    # ---- evaluation
    Mutation("no_eval_at_start", "train.py", "no evaluation before the first step",
             "progress.val_losses = run_evaluation(run, progress, config.eval_iters)", "progress.val_losses = {}",
             (f"{PT}::test_log_interval_and_the_logged_rates",)),
    Mutation("no_eval_at_end", "train.py", "no evaluation at the end unless max_iters is a multiple of eval_interval",
             "evaluating = progress.iter_num % config.eval_interval == 0 or finished",
             "evaluating = progress.iter_num % config.eval_interval == 0",
             (f"{PT}::test_log_interval_and_the_logged_rates",)),
    Mutation("step_waits_for_itself", "train.py",
             "each step waits for its own loss before returning: the device idles while the host queues the next step",
             "        outcome = StepOutcome(loss_and_stop, world_size)\n",
             "        outcome = StepOutcome(loss_and_stop, world_size).wait()\n",
             ("tests/test_train.py::test_a_step_returns_before_its_loss_is_read_and_the_next_step_checks_it",)),
    Mutation("step_before_never_checked", "train.py",
             "the step before's loss is never waited for: a nan between log lines trains on unnoticed",
             "        if previous is not None:\n            previous.wait()\n",
             "        if False:\n            previous.wait()\n",
             ("tests/test_train.py::test_a_step_returns_before_its_loss_is_read_and_the_next_step_checks_it",
              "tests/test_train.py::test_a_non_finite_loss_between_log_lines_names_its_iter")),
    Mutation("non_finite_iter_off_by_one", "train.py", "a non-finite loss read during the next step names that step",
             'raise diverged(f"loss is {err.loss} at iter {progress.iter_num}"',
             'raise diverged(f"loss is {err.loss} at iter {progress.iter_num + 1}"',
             ("tests/test_train.py::test_a_non_finite_loss_between_log_lines_names_its_iter",)),
    Mutation("eval_batch_size_default", "train.py", "evaluation batches of batch_size windows at every length",
             "config.eval_batch_size or max(1, config.batch_size * config.block_size // T)",
             "config.eval_batch_size or config.batch_size",
             (f"{PT}::test_evaluation_windows_lengths_and_batch_sizes",)),
    Mutation("eval_lengths_off_by_one", "train.py", "default evaluation lengths leave out the one equal to block_size",
             "(4096, 8192, 16384) if T <= block_size)", "(4096, 8192, 16384) if T < block_size)",
             (f"{PT}::test_default_eval_block_sizes",)),
    Mutation("eval_windows_from_global_rng", "train.py", "evaluation windows drawn from the global numpy RNG",
             "np.random.default_rng((EVAL_SEED, block_size)).integers(0, n_tokens - block_size, size=n_windows)",
             "np.random.randint(0, n_tokens - block_size, size=n_windows)",
             (f"{PT}::test_evaluation_windows_lengths_and_batch_sizes",
              f"{PT}::test_evaluate_does_not_depend_on_global_random_state")),
    Mutation("eval_leaves_eval_mode", "train.py", "evaluation leaves the model in eval mode (dropout off)",
             "    model.train(was_training)\n", "",
             (f"{PT}::test_evaluate_does_not_depend_on_global_random_state",)),
    Mutation("uint32_read_as_uint16", "train.py", "token files always read as uint16",
             'dtype = np.dtype(meta["dtype"])', "dtype = np.dtype(np.uint16)",
             (f"{PT}::test_uint32_token_files_are_read_as_uint32",)),
    # ---- model: SLA head count, loss, FLOPs, sampling
    Mutation("skip_heads_int", "model.py", "int() instead of round() for the skip-head count",
             "return round(self.sla_head_ratio * self.n_head) if self.sla else 0",
             "return int(self.sla_head_ratio * self.n_head) if self.sla else 0",
             (PM,)),
    Mutation("chunked_backward_ignores_upstream", "model.py", "the chunked loss's backward ignores grad_loss",
             "return grad_hidden * grad_loss, (grad_weight * grad_loss).to(ctx.weight_dtype), None, None",
             "return grad_hidden, grad_weight.to(ctx.weight_dtype), None, None",
             (f"{PM}::test_chunked_loss_backward_scales_with_the_upstream_gradient",)),
    Mutation("chunked_loss_drops_last_chunk", "model.py", "the chunked loss skips its ragged last chunk",
             "for start in range(0, hidden.size(0), chunk_size):",
             "for start in range(0, hidden.size(0) - chunk_size + 1, chunk_size):",
             ("tests/test_model.py::test_chunked_loss_matches_full_logits_loss_and_gradients",)),
    Mutation("skip_source_off_by_one", "model.py", "skip heads read layer l - sla_skip + 1",
             "            return layer - self.sla_skip\n", "            return layer - self.sla_skip + 1\n",
             ("tests/test_model.py::test_logits_match_naive_float64_reference",)),
    Mutation("generate_ignores_top_k", "model.py", "generate samples from all tokens whatever top_k says",
             "if top_k is not None:", "if False:",
             (PM, "tests/test_promises_sample.py")),
    Mutation("generate_top_k_plus_one", "model.py", "generate keeps k + 1 tokens",
             "torch.topk(logits, min(top_k, logits.size(-1)))", "torch.topk(logits, min(top_k + 1, logits.size(-1)))",
             (PM,)),
    Mutation("generate_ignores_temperature", "model.py", "generate samples at temperature 1 whatever it is given",
             "logits = logits / temperature", "logits = logits",
             (PM, "tests/test_promises_sample.py")),
    Mutation("flops_attention_halved", "model.py", "attention FLOPs counted as 6·L·C·T",
             "12 * cfg.n_layer * cfg.n_embd * (seq_len or cfg.block_size)",
             "6 * cfg.n_layer * cfg.n_embd * (seq_len or cfg.block_size)",
             ("tests/test_model.py::test_flops_per_token_counts_the_matmuls_of_a_training_step",
              "tests/test_model.py::test_gpt2_small_flops_per_token")),
    Mutation("flops_count_position_embeddings", "model.py", "FLOPs charge the position embeddings as weights",
             "6 * self.get_num_params() +", "6 * self.get_num_params(non_embedding=False) +",
             ("tests/test_model.py::test_flops_per_token_counts_the_matmuls_of_a_training_step",
              "tests/test_model.py::test_gpt2_small_flops_per_token")),
    Mutation("gpu_peak_a100_sparse", "model.py", "the A100's sparse peak (624 TFLOPS) instead of the dense one",
             '("A100", 312e12)', '("A100", 624e12)',
             ("tests/test_model.py::test_gpu_peak_lookup_and_mfu",)),
    # ---- scripts
    Mutation("sample_drops_top_k", "sample.py", "sample.py does not pass --top_k to generate",
             "config.max_new_tokens, config.temperature, config.top_k, generator",
             "config.max_new_tokens, config.temperature, None, generator",
             ("tests/test_promises_sample.py",)),
    Mutation("sample_drops_temperature", "sample.py", "sample.py samples at temperature 1 whatever --temperature says",
             "config.max_new_tokens, config.temperature, config.top_k, generator",
             "config.max_new_tokens, 1.0, config.top_k, generator",
             ("tests/test_promises_sample.py",)),
    Mutation("prepare_seed_ignored", "prepare_openwebtext.py", "--seed does not change the validation split",
             "np.random.default_rng(seed).choice(", "np.random.default_rng(0).choice(",
             ("tests/test_promises_data.py::test_seed_decides_the_validation_split",)),
    Mutation("prepare_meta_always_uint16", "prepare_openwebtext.py", "meta.json says uint16 for any vocabulary",
             'dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"', 'dtype = "uint16"',
             (UINT32,)),
    Mutation("prepare_tokens_always_uint16", "prepare_openwebtext.py", "token files written as uint16 always",
             "dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32", "dtype = np.uint16",
             (UINT32,)),
    Mutation("prepare_rate_from_rounded_seconds", "prepare_openwebtext.py",
             "the overall MB/s divides by the splits' rounded seconds: 0.0 on a small corpus",
             "/ 1e6 / tokenize_seconds, 3)", '/ 1e6 / sum(s["seconds"] for s in splits.values()), 3)',
             ("tests/test_prepare.py::test_stats_of_splits_tokenized_in_under_a_millisecond",)),
    # ---- --attention=fa4
    Mutation("train_fa4_ignored", "train.py", "train.py --attention=fa4 trains with SDPA all the same",
             'kernels={"attention": attention}', "kernels={}",
             ("tests/test_fa4.py::test_train_py_trains_through_fa4",)),
    Mutation("fa4_dropout_ignored", "fa4.py", "attention=fa4 with dropout > 0 trains without the dropout",
             "        if dropout > 0:  # refused", "        if False:  # refused",
             ("tests/test_fa4.py::test_attention_errors_name_the_key_and_the_fix",)),
    Mutation("resume_attention_changes_the_run", "train.py", "a resume that switches attention is called inexact",
             '"compile_optimizer", "attention",\n}', '"compile_optimizer",\n}',
             ("tests/test_fa4.py::test_resume_may_switch_attention",)),
    # ---- decoding
    Mutation("decode_freeze_ignored", "model.py", "compile_decode_step(freeze_weights=True) compiles without freezing",
             "inductor_config.freezing, True", "inductor_config.freezing, False",
             ("tests/test_decode.py::test_frozen_decode_step_gives_the_same_tokens_and_keeps_the_weights_it_compiled_with",)),
    Mutation("decode_freeze_not_default", "configurator.py", "--compile no longer freezes the decode step's weights "
             "by default (sample.py, bench.py)",
             "return compile if freeze_weights is None", "return False if freeze_weights is None",
             ("tests/test_sample.py::test_freeze_weights_follows_compile_unless_given",
              "tests/test_sample.py::test_compiled_decode_step_gives_the_same_samples_and_reports_compilation_apart",
              "tests/test_bench.py::test_decode_freezes_the_weights_when_compiled_unless_told_not_to")),
    Mutation("generate_temperature_type_recompiles", "model.py", "generate passes temperature on as given (0 and 0.0 "
             "compile two decode steps)",
             "        temperature = float(temperature)  #", "        temperature = temperature  #",
             ("tests/test_decode.py::test_compiled_decode_step_is_one_graph_per_sampling_for_every_prompt_and_gives_the_same_tokens",)),
    # ---- K/V that no layer reads, and FA4's packed gradient
    Mutation("unread_kv_wrong_rows", "model.py", "SLA layers keep the K/V rows of the first heads, not the read ones",
             "slice(C + first * self.head_dim, 2 * C)", "slice(C, 2 * C - first * self.head_dim)",
             ("tests/test_model.py::test_skipping_unread_kv_keeps_the_loss_and_every_gradient",)),
    Mutation("unread_kv_still_computed", "model.py", "SLA layers compute the K/V that no layer reads",
             "first = self.first_read_head if self.skip_unread_kv else 0", "first = 0",
             ("tests/test_model.py::test_skipping_unread_kv_removes_their_matmul_work",)),
    Mutation("fa4_never_packed", "fa4.py", "FA4 reads copies of q, k and v, never c_attn's output (nor the earlier "
             "layer's K/V) in place",
             "    if qkv is None:\n        qkv = torch.cat", "    if True:\n        qkv = torch.cat",
             ("tests/test_fa4.py::test_fa4_model_trains_as_sdpa",)),
    Mutation("fa4_unread_kv_grad_unset", "fa4.py", "FA4's backward leaves the gradient of own K/V heads that only a "
             "later layer reads uninitialised",
             "        grad.zero_()\n", "        pass\n",
             ("tests/test_fa4.py::test_fa4_model_trains_as_sdpa",)),
    Mutation("fa4_side_stream_starts_early", "fa4.py", "the side stream does not wait for the current one: FA4's "
             "second head group may read its inputs before they are written",
             "    side.wait_stream(main)", "    pass",
             ("tests/test_fa4.py::test_second_head_group_runs_on_a_side_stream_joined_both_ways",)),
    Mutation("fa4_side_stream_not_joined", "fa4.py", "the current stream does not wait for the side stream: later "
             "kernels may read the second head group's outputs before they are written",
             "    main.wait_stream(side)", "    pass",
             ("tests/test_fa4.py::test_second_head_group_runs_on_a_side_stream_joined_both_ways",)),
    Mutation("fa4_one_stream", "fa4.py", "both FA4 head groups run on the current stream, one after the other",
             "    with torch.cuda.stream(side):\n        second()", "    if True:\n        second()",
             ("tests/test_fa4.py::test_second_head_group_runs_on_a_side_stream_joined_both_ways",)),
    # ---- the training step's levers: compile_mode, compile_optimizer, attention=auto, kernel choices
    Mutation("compile_mode_without_compile", "configurator.py", "compile_mode without compile is accepted and does "
             "nothing (train.py, bench.py)",
             '    if compile_mode != "default" and not compile:', "    if False:",
             (f"{TS}::test_compile_mode_errors_name_the_key",
              "tests/test_bench.py::test_bad_settings_are_config_errors")),
    Mutation("cuda_graphs_with_accumulation", "train.py", "CUDA-graph compile modes train with gradient accumulation, "
             "whose gradients a later micro-step's replay overwrites",
             "    if config.gradient_accumulation_steps > 1:\n", "    if False:\n",
             (f"{TS}::test_cuda_graph_modes_refuse_accumulation_and_ddp",)),
    Mutation("cuda_graphs_under_ddp", "train.py", "CUDA-graph compile modes run under DDP unverified",
             "    if world_size > 1:\n        raise ConfigError(\n            f\"{runs_as}",
             "    if False:\n        raise ConfigError(\n            f\"{runs_as}",
             (f"{TS}::test_cuda_graph_modes_refuse_accumulation_and_ddp",)),
    Mutation("compile_optimizer_float16", "train.py", "compile_optimizer runs with float16, compiling around the loss "
             "scaling it needs",
             'if config.compile_optimizer and dtype == "float16" and not config.eval_only:', "if False:",
             (f"{TS}::test_compile_optimizer_refuses_float16",)),
    Mutation("compile_optimizer_ignored", "train.py", "train.py --compile_optimizer=True steps the optimizer eagerly",
             "compile_optimizer=config.compile_optimizer,\n", "compile_optimizer=False,\n",
             (f"{TS}::test_compiled_optimizer_trains_as_eager_and_a_run_may_switch_to_it",)),
    Mutation("compiled_lr_a_constant", "train.py", "the schedule replaces a compiled step's learning-rate tensor by a "
             "float: the step is compiled anew for every value",
             '            group["lr"].fill_(lr)  #', '            group["lr"] = lr  #',
             (f"{TS}::test_compiled_optimizer_trains_as_eager_and_a_run_may_switch_to_it",)),
    Mutation("optimizer_kernels_from_checkpoint", "train.py", "a resumed run takes the saved optimizer's "
             "implementation and learning-rate object, not its own",
             "{**saved_group, **{key: group[key] for key in OPTIMIZER_KERNEL_KEYS}}", "saved_group",
             (f"{TS}::test_compiled_optimizer_trains_as_eager_and_a_run_may_switch_to_it",)),
    Mutation("step_never_syncs_ddp", "train.py", "the training step skips DDP's all-reduce on every micro-step, the "
             "last one too",
             "if ddp_model is not None and not last_micro_step", "if ddp_model is not None",
             ("tests/test_train.py::test_ddp_two_processes_match_one_with_same_global_batch",)),
    Mutation("auto_never_fa4", "fa4.py", "attention=auto always chooses SDPA",
             '        return "sdpa"\n    return "fa4"\n', '        return "sdpa"\n    return "sdpa"\n',
             ("tests/test_fa4.py::test_auto_attention_is_fa4_where_it_runs",)),
    Mutation("auto_fa4_on_any_gpu", "fa4.py", "attention=auto chooses FA4 on GPUs other than Hopper and Blackwell",
             "if torch.cuda.get_device_capability(device)[0] not in FA4_GPU_MAJORS:", "if False:",
             ("tests/test_fa4.py::test_auto_attention_is_fa4_where_it_runs",)),
    Mutation("auto_fa4_with_dropout", "fa4.py", "attention=auto chooses FA4, which has no dropout, with dropout > 0",
             "if dropout > 0 or not device.startswith", "if not device.startswith",
             ("tests/test_fa4.py::test_auto_attention_is_fa4_where_it_runs",)),
    Mutation("log_config_says_auto", "train.py", "the log's config says attention=auto, not the kernel that ran",
             '"config": {**asdict(config), "attention": run.model.config.attention},', '"config": asdict(config),',
             ("tests/test_fa4.py::test_train_py_records_which_attention_auto_chose",)),
    Mutation("checkpoint_fixes_kernels", "checkpoint.py", "a checkpoint's kernel choices override the reader's",
             'saved = {key: value for key, value in checkpoint["model_args"].items() if key not in KERNEL_KEYS}',
             'saved = dict(checkpoint["model_args"])',
             (f"{TS}::test_kernel_choices_are_the_models_configuration_not_the_checkpoints",)),
    Mutation("resume_ignores_kernels", "train.py", "a resumed run computes with the default kernels, not its own",
             "model_from_checkpoint(checkpoint, dropout=config.dropout, **kernels)",
             "model_from_checkpoint(checkpoint, dropout=config.dropout)",
             ("tests/test_fa4.py::test_resume_may_switch_attention",)),
    # ---- provenance
    Mutation("provenance_untracked_dirty", "configurator.py", "an untracked file (an output) marks the code dirty",
             '"--porcelain", "--untracked-files=no"', '"--porcelain"',
             (f"{TS}::test_provenance_names_the_commit_and_uncommitted_changes",)),
    Mutation("provenance_never_dirty", "configurator.py", "uncommitted changes to the code are not recorded",
             'record["dirty"] = _git("status"', 'record["dirty"] = False and _git("status"',
             (f"{TS}::test_provenance_names_the_commit_and_uncommitted_changes",)),
    Mutation("provenance_outer_repository", "configurator.py", "code copied into another repository records that "
             "repository's commit",
             "if os.path.realpath(top) != os.path.realpath(CODE_DIR):", "if False:",
             (f"{TS}::test_provenance_names_the_commit_and_uncommitted_changes",)),
    Mutation("bench_fixed_order", "bench.py", "bench.py times the models in one order every round (clock drift "
             "favours the model timed first)",
             "group if number % 2 == 0 else group[::-1]", "group",
             ("tests/test_bench.py::test_nanogpt_peer_timed_round_robin_on_the_same_data",)),
    Mutation("bench_data_ignored", "bench.py", "bench.py --data is ignored: always synthetic batches",
             'if config.data == "synthetic":\n        # Step time', "if True:\n        # Step time",
             ("tests/test_bench.py::test_real_data_folder",)),
    Mutation("gap_sign_flipped", "plot_results.py", "the gap against tokens is plain − SLA, not SLA − plain",
             "sla[tokens] - plain[tokens] for tokens", "plain[tokens] - sla[tokens] for tokens",
             ("tests/test_plot_results.py::test_gap_against_tokens_recomputed_from_the_logs",)),
    Mutation("best_arm_among_ignored", "plot_results.py", "--best_sla_arm --among ranks every SLA arm, not the given",
             "(among is None or arm in among)", "True",
             ("tests/test_plot_results.py::test_told_apart_and_best_among_arms",
              "tests/test_sla_ablation.py::test_head_ratio_runs_follow_the_skip_arms_and_extend_a_ratio_that_beats_0_75")),
    Mutation("campaign_more_seeds_always", "experiments/sla_ablation.sh", "the medium campaign adds seeds 5 and 6 "
             "even where the best arm's gap is already told apart from seed noise",
             '[ "$(ask_logs --told_apart "$best" --seeds 1 2 3 4)" = no ] && runs', "runs",
             ("tests/test_sla_ablation.py::test_medium_campaign_adds_seeds_5_and_6_only_if_the_best_gap_is_not_told_apart_at_seed_4",)),
    Mutation("campaign_stops_at_first_yes", "experiments/sla_ablation.sh", "the medium campaign decides on every seed "
             "logged so far: a seed 5 that lands told apart cancels seed 6 (optional stopping)",
             '--told_apart "$best" --seeds 1 2 3 4)', '--told_apart "$best")',
             ("tests/test_sla_ablation.py::test_medium_campaign_adds_seeds_5_and_6_only_if_the_best_gap_is_not_told_apart_at_seed_4",)),
    Mutation("ablation_seeds_ignored", "plot_results.py", "--ablation --seeds reads every seed's logs, not the given",
             "if seed in args.seeds}", "if True}",
             ("tests/test_sla_ablation.py::test_medium_campaign_adds_seeds_5_and_6_only_if_the_best_gap_is_not_told_apart_at_seed_4",)),
    Mutation("campaign_ratio_always_extended", "experiments/sla_ablation.sh", "every head ratio gets seeds 3 and 4, "
             "also one whose mean is above ratio 0.75's",
             '--among sla-skip9 "$arm" --seeds 1 2)" = "$arm" ]', '--among sla-skip9 "$arm" --seeds 1 2)" != none ]',
             ("tests/test_sla_ablation.py::test_head_ratio_runs_follow_the_skip_arms_and_extend_a_ratio_that_beats_0_75",)),
    Mutation("campaign_plan_failure_hidden", "experiments/sla_ablation.sh", "a failure inside the campaign's plan "
             "is swallowed by the for loop over it: a call starts nothing and says every run is logged",
             "planned=$(plan)  # a plain assignment", "planned=$(plan || true)  # a plain assignment",
             ("tests/test_sla_ablation.py::test_a_log_folder_holding_another_ablations_run_stops_the_campaign",)),
    Mutation("ablation_logs_mixed", "plot_results.py", "an ablation folder takes a log of another ablation (another "
             "model or context) as one of its runs",
             "if shape != first_shape:", "if False:",
             ("tests/test_sla_ablation.py::test_a_log_folder_holding_another_ablations_run_stops_the_campaign",)),
    Mutation("prepare_swallowed_stop_lost", "prepare_openwebtext.py", "a stop signal whose Stopped Python dropped in "
             "an at-fork hook is lost: the run goes on to write its outputs and exits 0",
             "    if _stop_signal is not None:\n        raise Stopped", "    if False:\n        raise Stopped",
             (f"{SF}::test_prepare_stopped_by_a_signal_that_lands_in_a_fork_hook_still_stops",)),
    Mutation("prepare_swallowed_stop_traceback", "prepare_openwebtext.py", "a Stopped dropped in an at-fork hook "
             "prints Python's 'Exception ignored' traceback",
             "    sys.unraisablehook = quiet_after_a_stop\n", "",
             (f"{SF}::test_prepare_stopped_by_a_signal_that_lands_in_a_fork_hook_still_stops",)),
    Mutation("plot_mode_flag_dropped", "plot_results.py", "a flag the chosen mode does not read (--seeds with --gap) "
             "is dropped without a word",
             "if value and not args.ablation:", "if False:",
             ("tests/test_plot_results.py::test_a_flag_the_mode_does_not_read_is_refused",)),
    Mutation("medium_config_small_skip", "config/train_gpt2_medium_8k.py", "the medium 8K config keeps the small "
             "model's sla_skip=9, not the skip distance its ablation measured best",
             "sla_skip = 15\n", "sla_skip = 9\n",
             ("tests/test_promises_train.py::test_gpu_configs_train_with_nanogpts_schedule_and_the_default_sla",)),
    Mutation("cost_flops_without_unread_kv", "plot_results.py", "the cost table counts the K/V rows that SLA "
             "layers leave out of c_attn",
             "(flops - 6 * unread_kv_rows * sla.n_embd) / flops", "1.0",
             ("tests/test_plot_results.py::test_cost_table_counts_the_unread_kv_of_each_arm",)),
]  # fmt: skip


def scratch_copy(destination: Path) -> Path:
    """The repo's tracked and untracked, not ignored, files under destination/repo; destination/shared points at
    the real ../shared, where the tests find their data."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    repo = destination / "repo"
    for name in filter(None, files):
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    if (REPO.parent / "shared").exists():
        (destination / "shared").symlink_to(REPO.parent / "shared")
    return repo


def run_tests(repo: Path, tests: tuple[str, ...], timeout: int) -> tuple[int, str, float]:
    """pytest's exit status, the first failing test, and the seconds it took."""
    started = time.perf_counter()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
            cwd=repo, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout} s", time.perf_counter() - started
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.MULTILINE)
    detail = failed.group(1) if failed else (result.stdout.strip().splitlines() or [""])[-1]
    return result.returncode, detail, time.perf_counter() - started


def write_report(path: Path, rows: list[dict], started: datetime.datetime, full: bool, seconds: float):
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    counts = {verdict: sum(row["verdict"] == verdict for row in rows) for verdict in ("caught", "SURVIVED", "stale")}
    lines = [
        "# Mutation report",
        "",
        f"`python tools/mutate.py{' --full' if full else ''}` (`make mutate`) on {started:%Y-%m-%d %H:%M} UTC, commit "
        f"{commit.stdout.strip()}{' with uncommitted changes' if dirty else ''}, {seconds / 60:.1f} min: "
        f"**{counts['caught']} of {len(rows)} mutants caught**, {counts['SURVIVED']} survived, "
        f"{counts['stale']} stale.",
        "",
        "Each mutant is one small bug applied to a scratch copy of the repo; caught means the listed tests "
        f"({'the whole suite' if full else 'the ones meant to catch it'}) went red.",
        "",
        "| mutant | file | bug | verdict | first failing test | s |",
        "|---|---|---|---|---|---:|",
    ]
    for row in rows:
        lines.append(
            f"| `{row['name']}` | {row['file']} | {row['bug']} | {row['verdict']} | {row['detail']} | "
            f"{row['seconds']:.0f} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated mutant names")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--full", action="store_true", help="run the whole suite against each mutant")
    parser.add_argument("--report", default="results/mutation/report.md", help="'' writes none")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per mutant")
    args = parser.parse_args(argv)

    mutations = MUTATIONS
    if args.only:
        names = args.only.split(",")
        if unknown := set(names) - {m.name for m in MUTATIONS}:
            parser.error(f"unknown mutants {sorted(unknown)}; --list shows them")
        mutations = [m for m in MUTATIONS if m.name in names]
    if args.list:
        for m in mutations:
            print(f"{m.name:40} {m.file:24} {m.bug}")
        return 0

    started, clock = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutate-") as scratch:
        repo = scratch_copy(Path(scratch))
        baseline_tests = () if args.full else tuple(dict.fromkeys(t for m in mutations for t in m.tests))
        print(f"baseline: the {'whole suite' if args.full else f'{len(baseline_tests)} test targets'} unmutated")
        status, detail, seconds = run_tests(repo, baseline_tests, args.timeout * 2)
        if status != 0:
            print(f"the unmutated tests fail ({detail}): fix them first", file=sys.stderr)
            return 2
        print(f"  green in {seconds:.0f} s")
        rows = []
        for number, m in enumerate(mutations, 1):
            path = repo / m.file
            original = path.read_text()
            row = {"name": m.name, "file": m.file, "bug": m.bug, "detail": "", "seconds": 0.0}
            if original.count(m.before) != 1:
                row.update(verdict="stale", detail=f"`before` text found {original.count(m.before)} times")
            else:
                path.write_text(original.replace(m.before, m.after))
                try:
                    status, detail, seconds = run_tests(repo, () if args.full else m.tests, args.timeout)
                finally:
                    path.write_text(original)
                row.update(verdict="caught" if status != 0 else "SURVIVED", detail=detail, seconds=seconds)
            print(f"[{number}/{len(mutations)}] {m.name}: {row['verdict']} ({row['detail']}, {row['seconds']:.0f} s)")
            rows.append(row)
    elapsed = time.perf_counter() - clock
    if args.report:
        write_report(REPO / args.report, rows, started, args.full, elapsed)
        print(f"wrote {args.report}")
    survivors = [row["name"] for row in rows if row["verdict"] != "caught"]
    print(f"{len(rows) - len(survivors)} of {len(rows)} caught" + (f"; not caught: {survivors}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
