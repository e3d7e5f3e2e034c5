"""The serving engine: continuous batching over the slot decoder, for every caller.

Why: the API used to form a batch from the requests already waiting and run it until its
longest row ended, so a row that finished early held its place and arrivals waited for the
whole batch; chats and streams ran alone. On an H100 (``7b-random``, 680-token pages, 128
new tokens) that served 1.0-4.2 requests/s with 32 clients. Here, as in vLLM and SGLang,
requests join a running batch as rows free up and each row leaves at its own end:

- a bounded waiting queue (past it :class:`Overloaded`, which the API answers with 503 and
  ``Retry-After``);
- each loop turn prefills up to ``max_prefill_tokens`` prompt tokens into free cache slots
  (several arrivals side by side; a longer prompt in chunks over several turns, as vLLM's
  chunked prefill does), then runs one decoding step for every running row: a page's prefill
  pauses the running rows for one chunk at a time, never for a whole batch of pages;
- a row ends at its end-of-sequence token, its own ``max_tokens`` or stop string, or when its
  caller cancels it (timeout, hang-up); its slot is free for the next turn;
- a failure in one request's prefill is retried alone, so it fails only that request.

Prompts are prepared (chat template, image processor: ~26 ms of CPU per page) by the caller's
thread in :meth:`Engine.prepare`, off the engine's loop. The API, the CLI, the benchmark
harness and phase 7 all decode through this class.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from medvl.engine.grammar import Grammars, ResponseFormat, RowGrammar
from medvl.engine.slot_cache import PromptRow, PromptTooLong, SlotDecoder

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The waiting queue is full; the caller should retry later."""


class EngineDead(RuntimeError):
    """The engine's loop failed (a decoding step raised; on a GPU, a device error leaves the
    CUDA context unusable): every pending and running request fails with this, later submits
    too, and the process must be restarted (vLLM's EngineDeadError)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it ends.

    ``temperature`` 0 is greedy (the default: extraction answers should not vary run to run).
    With ``seed`` set, sampling draws from a generator of its own: the same request gives the
    same answer again.
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks on random weights: always max_tokens tokens (not with a grammar)
    response_format: ResponseFormat | None = None  # decode under this grammar (medvl.engine.grammar)
    # None: no log-probabilities; k (0-20): each chosen token's log-probability and the k most
    # likely tokens' (see :func:`token_logprobs` for which distribution).
    logprobs: int | None = None


MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the ``top`` alternatives (id, log-probability),
    most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Prompt:
    """A prepared prompt: the processor's tensors for one request, on the CPU; with the vision
    tower run at preparation (``decode.vision_in_prepare``), its image embeddings instead of the
    pixels, on the model's device, ready once ``ready`` (a CUDA event) has passed."""

    tensors: dict[str, torch.Tensor] = field(repr=False)  # (a page's tensors take milliseconds to print)
    ready: Any = None  # torch.cuda.Event recorded after the image embeddings, or None

    @property
    def length(self) -> int:
        return int(self.tensors["input_ids"].shape[1])


@dataclass
class _VisionJob:
    """A prompt's pixels waiting for the vision tower (:meth:`Engine._encode_images`)."""

    pixels: torch.Tensor
    grid: torch.Tensor
    embeds: torch.Tensor | None = None
    ready: Any = None
    error: Exception | None = None


@dataclass
class Result:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # stop | length | cancelled
    queue_s: float  # waiting for a slot
    ttft_s: float  # submit to first token
    latency_s: float  # submit to last token
    closed_early: bool = False  # a grammar row steered to close its JSON as its budget ran out
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked (SamplingParams.logprobs)

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)


class EngineMetrics:
    """What the engine reports as it works; the API's Prometheus metrics subclass this."""

    def prompt_tokens(self, n: int) -> None: ...
    def generation_tokens(self, n: int) -> None: ...
    def time_to_first_token(self, seconds: float) -> None: ...
    def inter_token_latency(self, seconds: float) -> None: ...
    def request_finished(self, reason: str) -> None: ...


@dataclass
class EngineStats:
    """Where the engine loop's time goes (host wall clock, as the loop sees it; a prefill's
    includes waiting for the step in flight). Read by /metrics and the load benchmark."""

    prefills: int = 0
    prefill_rows: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    steps: int = 0
    step_rows: int = 0
    step_launch_s: float = 0.0  # CPU time to queue steps (the GPU runs them meanwhile); with grammar
    # rows it includes reading the previous step's tokens and the masks (the GPU runs the forward pass)
    grammar_masks: int = 0  # rows masked by their grammar, over all steps
    grammar_mask_s: float = 0.0  # CPU time computing those masks and applying them

    def prefill(self, rows: int, tokens: int, seconds: float) -> None:
        self.prefills += 1
        self.prefill_rows += rows
        self.prefill_tokens += tokens
        self.prefill_s += seconds

    def step(self, rows: int, seconds: float) -> None:
        self.steps += 1
        self.step_rows += rows
        self.step_launch_s += seconds

    def masks(self, rows: int, seconds: float) -> None:
        self.grammar_masks += rows
        self.grammar_mask_s += seconds


@dataclass(eq=False)
class Request:
    """One request's life in the engine. ``on_text`` (streaming) is called from the engine's
    thread with each new piece of text and the log-probabilities of the tokens it covers (empty
    unless ``params.logprobs`` asks); it must not block."""

    prompt: Prompt
    params: SamplingParams
    on_text: Callable[[str, list[TokenLogprob]], None] | None = None
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    # set by the engine
    admitted: float = 0.0
    first_token: float = 0.0
    last_token: float = 0.0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when asked
    text: str = ""  # detokenized so far (streams and stop strings only)
    _read: int = 0  # tokens already turned into text
    _prefix: int = 0  # where the last text piece started (for multi-token characters)
    _sent: int = 0  # characters of ``text`` already passed to ``on_text``
    _logprobs_sent: int = 0  # entries of ``logprobs`` already passed to ``on_text``
    generator: torch.Generator | None = None
    grammar: RowGrammar | None = None  # the row's matcher, when it decodes under a response format
    slot: int = -1  # the cache slot while running (or while its prompt is prefilled in chunks)
    row: PromptRow | None = None  # the prompt on the device, from admission to the end of its prefill
    prefilled: int = 0  # prompt tokens already in the cache
    withdraw: Callable[[Request], None] | None = None  # set by the engine: takes it out of the queue

    def cancel(self) -> None:
        """Drop this request: if it still waits it leaves the queue at once (it no longer holds a
        place under ``max_waiting``); if it runs, its slot frees on the engine's next turn."""
        self.cancelled = True
        if self.withdraw is not None:
            self.withdraw(self)


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities reach ``top_p``."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # the first token is always kept
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)
    return filtered / filtered.sum()


# Temperatures below this are greedy: dividing float32 logits by 1e-300 (a fuzzer sent it)
# divides by a rounded 0 and gives nan; at 1e-4 the distribution is one-hot anyway.
GREEDY_BELOW = 1e-4


def choose_tokens(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Greedy argmax for greedy rows; temperature/top-p sampling (own generator) for the rest."""
    tokens = logits.argmax(dim=-1)
    for row, request in enumerate(requests):
        params = request.params
        if params.temperature < GREEDY_BELOW:
            continue
        # Shifted so the largest logit is 0: a small temperature then sends the others to -inf
        # (a one-hot distribution), never to inf - inf = nan.
        scaled = (logits[row] - logits[row].max()) / params.temperature
        probs = _top_p_filter(torch.softmax(scaled, dim=-1), params.top_p)
        tokens[row] = _sample(probs, request.generator)
    return tokens


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token drawn from ``probs`` (a 0-dim tensor on their device), never waiting for the GPU.

    ``argmax(p / e)`` with ``e`` exponential(1) picks token ``i`` with probability ``p_i`` (the
    exponential race); ``torch.multinomial`` draws the same distribution but, on a GPU, waited
    for the queued work (py-spy: 9% of the engine thread in a load test).
    """
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax()


def _token_logprob(token: int, values: list[float], top: int) -> TokenLogprob:
    """A row of :func:`token_logprobs` as a :class:`TokenLogprob` with its first ``top`` alternatives."""
    width = (len(values) - 1) // 2
    alternatives = zip(values[1 + width:1 + width + top], values[1:1 + top], strict=True)
    return TokenLogprob(token, values[0], tuple((int(i), v) for i, v in alternatives))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> torch.Tensor:
    """``[rows, 1 + 2 * top]`` float32: each row's chosen token's log-probability, then the
    ``top`` most likely tokens' log-probabilities and ids (ids as floats, exact below 2**24).

    The distribution is the one the token was chosen from before temperature and top-p: the
    model's logits after the repetition penalty and, for a row under a response format, its
    grammar's mask (the probability among the tokens the grammar allows; a greedy token is the
    most likely of them). Computed on the device and copied back with the tokens: no wait.
    """
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, tokens.view(-1, 1))
    values, ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], logprobs[:, :0])
    return torch.cat([chosen, values, ids.float()], dim=1)


class Engine:
    """Continuous batching over a :class:`SlotDecoder`; one thread runs the loop.

    ``start()`` runs the loop in a worker thread (the API). Without it, :meth:`generate` runs
    the loop in the calling thread until its request ends (CLI, harness, phase 7).
    """

    def __init__(self, model: Any, processor: Any, decoder: SlotDecoder, max_waiting: int,
                 max_prefill_tokens: int, metrics: EngineMetrics | None = None, vision_in_prepare: bool = False) -> None:
        self.model = model
        self.processor = processor
        self.decoder = decoder
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.metrics = metrics or EngineMetrics()
        self.eos_ids = set(decoder.eos_ids)
        self.device = decoder.device
        self.vision_dtype = decoder.base.model.visual.dtype
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # running[i] decodes in cache slot i
        self.prefilling: Request | None = None  # a prompt partly prefilled (slot >= len(running)), goes on next turn
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = EngineStats()
        self._unread: list[tuple[list[Request], Any]] = []  # launched steps and prefills whose tokens are not read yet
        self.dead: EngineDead | None = None  # set once the loop has failed; the engine serves nothing after
        # Rust tokenizers refuse concurrent use that changes their padding state ("Already
        # borrowed"): callers prepare one at a time, and the loop detokenizes with its own copy.
        # A processor copy per preparing thread instead (no lock) served fewer requests on an
        # H100: 8.56 against 11.60 a second, 8 threads, 32 mixed clients, one call; the image
        # processor's torch ops each use every core already (docs/results/h100/README.md).
        self._prepare_lock = threading.Lock()
        # The vision tower in the preparing thread (one page at a time, on a CUDA stream of its
        # own): a page's ~22 ms of tower overlaps the loop's decoding steps instead of pausing them
        # inside the prefill (docs/results/h100/README.md, issue 32).
        self.vision_in_prepare = vision_in_prepare
        self._vision_lock = threading.Lock()  # one tower call at a time, over every queued page
        self._vision_queue: list[_VisionJob] = []
        self._vision_queue_lock = threading.Lock()
        self._vision_stream = torch.cuda.Stream(self.device) if vision_in_prepare and self.device.type == "cuda" else None
        self._detokenizer = copy.deepcopy(processor.tokenizer)
        self.grammars = Grammars(processor.tokenizer, decoder.vocab, decoder.eos_ids, self.device, decoder.slots)

    # ---- what callers use
    def prepare(self, image: Image.Image | None, prompt: str = "",
                messages: list[dict[str, Any]] | None = None) -> Prompt:
        """Chat template and image processing for one request (in the caller's thread).

        ``messages``: a whole chat (Qwen format, ``{"type": "image"}`` parts); otherwise one user
        turn of ``image`` and ``prompt``.
        """
        if messages is None:
            content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
            messages = [{"role": "user", "content": content}]
        with self._prepare_lock:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            tensors = dict(self.processor(text=[text], images=[image] if image is not None else None,
                                          return_tensors="pt"))
        if "pixel_values" in tensors:  # the vision tower's dtype now (the model casts to it first thing)
            tensors["pixel_values"] = tensors["pixel_values"].to(self.vision_dtype)
        if self.device.type == "cuda":
            # Pinned: the engine's copies to the GPU (a page is ~6 MB) then neither wait for the
            # stream nor stall the loop (pageable host-to-device copies synchronize the stream).
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        if self.vision_in_prepare and "pixel_values" in tensors:
            return self._encode_images(tensors)
        return Prompt(tensors)

    def _encode_images(self, tensors: dict[str, torch.Tensor]) -> Prompt:
        """Run the vision tower on the prompt's pixels now: ``image_embeds`` replace them.

        Why batched: the tower's cost on the preparing thread is mostly Python (32 eager blocks,
        ~50% of a preparing thread under load, py-spy), not GPU time (~6 ms a page), and one
        tower runs at a time. So pages queue here, and whichever thread takes the tower next runs
        every queued page in one call; the others find their embeddings made.
        """
        job = _VisionJob(tensors.pop("pixel_values"), tensors["image_grid_thw"])
        with self._vision_queue_lock:
            self._vision_queue.append(job)
        with self._vision_lock:
            if job.embeds is None and job.error is None:  # no other thread's call took it
                with self._vision_queue_lock:
                    jobs, self._vision_queue = self._vision_queue, []
                self._run_vision(jobs)
        if job.error is not None:
            raise job.error
        tensors["image_embeds"] = job.embeds
        return Prompt(tensors, job.ready)

    def _run_vision(self, jobs: list[_VisionJob]) -> None:
        """One tower call over every image of ``jobs`` (on the vision stream); each job gets its
        images' embeddings, or the call's error."""
        stream = self._vision_stream
        try:
            with torch.inference_mode(), (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
                # each job's pinned tensors copied on their own, then joined on the device
                pixels = torch.cat([job.pixels.to(self.device, non_blocking=True) for job in jobs])
                grid = torch.cat([job.grid.to(self.device, non_blocking=True) for job in jobs])
                features = self.decoder.base.model.get_image_features(pixels, grid)
                per_image = iter(features.pooler_output)
                ready = None
                if stream is not None:
                    ready = torch.cuda.Event()
                    ready.record(stream)
                for job in jobs:
                    job.embeds = torch.cat([next(per_image) for _ in range(job.grid.shape[0])], dim=0)
                    job.ready = ready
        except Exception as exc:  # retried one by one, so that a bad page fails alone
            if len(jobs) > 1:
                for job in jobs:
                    self._run_vision([job])
                return
            log.warning("the vision tower failed on a page: %s", exc)
            jobs[0].error = exc

    def submit(self, prompt: Prompt, params: SamplingParams,
               on_text: Callable[[str, list[TokenLogprob]], None] | None = None) -> Request:
        """Queue a request; raises :class:`PromptTooLong`, :class:`medvl.engine.grammar.GrammarError`
        (a response format that does not compile), :class:`Overloaded` or :class:`EngineDead` at once."""
        if self.dead is not None:
            raise self.dead
        self.decoder.check_fits(prompt.length, params.max_tokens)
        if params.logprobs is not None and not 0 <= params.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs: 0 to {MAX_TOP_LOGPROBS} alternatives, not {params.logprobs}")
        request = Request(prompt, params, on_text, withdraw=self._withdraw)
        if params.response_format is not None:
            request.grammar = self.grammars.row(params.response_format)
        if params.temperature > 0:
            request.generator = torch.Generator(device=self.device)
            if params.seed is not None:
                request.generator.manual_seed(params.seed)
            else:
                request.generator.seed()
        with self._wake:
            if self.dead is not None:
                raise self.dead
            if len(self.waiting) >= self.max_waiting:
                raise Overloaded(f"{len(self.waiting)} requests are waiting (the limit); retry shortly")
            self.waiting.append(request)
            self._wake.notify()
        return request

    def _withdraw(self, request: Request) -> None:
        """Take a cancelled request out of the waiting queue and resolve it (a running one is
        dropped by the loop, which owns the cache slots)."""
        with self._wake:
            # By identity, never by deque.remove's miss: its ValueError formats the request, tensors
            # and all (~8 ms on this project's CPU; 19% of the event loop's GIL time in an H100
            # profile, where every streamed chat withdraws itself at its end).
            index = next((i for i, waiting in enumerate(self.waiting) if waiting is request), None)
            if index is None:
                return  # admitted (the loop drops it) or already gone
            del self.waiting[index]
        self._resolve(request, "cancelled")

    def generate(self, prompt: Prompt, params: SamplingParams) -> Result:
        """Submit and wait; runs the loop here when no worker thread does."""
        return self.generate_many([prompt], [params])[0]

    def submit_many(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[Request]:
        """Queue requests together (a document's pages: they prefill and decode side by side as
        the cache slots allow); one refused at submission cancels those already queued, then raises."""
        requests: list[Request] = []
        try:
            for prompt, request_params in zip(prompts, params, strict=True):
                requests.append(self.submit(prompt, request_params))
        except Exception:
            for request in requests:
                request.cancel()
            raise
        return requests

    def generate_many(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[Result]:
        """:meth:`submit_many` and wait for all, results in order; runs the loop here when no
        worker thread does."""
        requests = self.submit_many(prompts, params)
        if self._thread is None:
            while not all(request.future.done() for request in requests):
                self.run_once()
            self.drain()
        return [request.future.result() for request in requests]

    def drain(self) -> None:
        """Read the step still in flight (its rows all ended; nothing is appended)."""
        unread, self._unread = self._unread, []
        for launched in unread:
            self._collect(*launched)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def kv_cache_reserved(self) -> float:
        """Share of the cache that running rows hold (0..1): each holds a whole slot, so with every
        slot taken this is 1 and the next request waits, however few tokens are filled."""
        return (len(self.running) + (self.prefilling is not None)) / self.decoder.slots

    @property
    def kv_cache_filled(self) -> float:
        """Share of the cache's token positions that running rows fill (0..1)."""
        used = sum(r.prompt.length + len(r.tokens) for r in self.running)
        return used / (self.decoder.slots * self.decoder.max_cache_len)

    # ---- the worker thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.waiting and not self.running and self.prefilling is None:
                with self._wake:  # (the lock only when idle: request threads take it to submit)
                    if not self.waiting:
                        self._wake.wait(timeout=0.5)
                continue
            try:
                self.run_once()
            except EngineDead:
                return  # every request has its error; the server reports it and exits

    def _die(self, exc: Exception) -> EngineDead:
        """Fail every waiting and running request without touching the device again (after a CUDA
        error any kernel may fail too), and refuse every later one."""
        dead = EngineDead(f"the engine failed and serves no more requests: {type(exc).__name__}: {exc}"[:500])
        log.critical("%s", dead, exc_info=exc)
        with self._wake:
            self.dead = dead
            pending = [*self.waiting, *self.running, *([self.prefilling] if self.prefilling else []),
                       *(r for rows, _ in self._unread for r in rows)]
            self.waiting.clear()
        self.running, self.prefilling, self._unread = [], None, []
        for request in pending:
            request.slot = -1
            if not request.future.done():
                request.future.set_exception(dead)
        return dead

    # ---- one turn: admit, prefill, decode
    def run_once(self) -> None:
        """One turn of the loop (:meth:`_turn`); any exception it raises kills the engine
        (:meth:`_die`) and is raised again as :class:`EngineDead`. A failure that concerns one
        request (its prefill, its grammar) fails that request inside the turn instead."""
        if self.dead is not None:
            raise self.dead
        try:
            self._turn()
        except Exception as exc:
            raise self._die(exc) from exc

    def _turn(self) -> None:
        """Prefill what the token budget allows; launch one decoding step for every running row;
        then read the earlier step's tokens (and the new rows' first tokens) while this one runs
        on the GPU.

        Why one step ahead: reading a step's tokens back is a GPU sync, and the CPU work after it
        (end checks, detokenizing, streaming, starting new rows: ~1-2 ms of Python, more when
        request threads hold the GIL) would otherwise leave the GPU idle between steps. The next
        step needs nothing from the CPU (each row's last token stays on the GPU), so it is
        queued before the CPU looks at the previous one. A row that ended in the previous step
        has one wasted token computed, which is dropped. A prefill's first tokens are read the
        same way: queueing a prefill never waits for the GPU (:meth:`SlotDecoder.prompt_row`).

        Grammar rows need their mask before their next token is chosen, and the mask depends on
        every token so far: when the batch holds one, the step's forward pass is queued first,
        then the unread tokens are read (while the GPU runs the forward pass), then the masks
        are computed and applied and the tokens chosen.
        """
        self._prefill_turn()
        self._drop_cancelled()
        unread, self._unread = self._unread, []
        launched = None
        if self.running:
            unread, launched = self._launch_step(unread)
        for tokens in unread:
            self._collect(*tokens)
        if launched is not None:
            self._unread.append(launched)

    def _launch_step(self, unread: list[tuple[list[Request], Any]]) -> tuple[list[tuple[list[Request], Any]], Any]:
        """Queue one step for every running row; returns (what of ``unread`` is still unread, the
        launched step). Rows that end while ``unread`` is read here are finished only after this
        step's tokens are recorded: finishing moves cache slots."""
        rows = list(self.running)
        ended: list[tuple[Request, str, Exception | None]] = []
        started = time.perf_counter()
        logits = self.decoder.step(len(rows))  # a failure here kills the engine (run_once)
        if unread and any(r.grammar is not None for r in rows):
            for tokens in unread:
                self._collect(*tokens, ended=ended)
            unread = []
        over = {id(request) for request, _, _ in ended}
        self._constrain(logits, [r if id(r) not in over else None for r in rows])
        tokens = choose_tokens(logits, rows)
        self.decoder.accept(0, tokens)
        self.stats.step(len(rows), time.perf_counter() - started)
        launched = rows, self._to_host(tokens, self._logprobs(logits, tokens, rows))
        for request, reason, error in ended:
            self._finish(request, reason, error)
        return unread, launched

    def _constrain(self, logits: torch.Tensor, rows: list[Request | None]) -> None:
        """Apply each grammar row's mask (row ``i`` of ``logits`` is ``rows[i]``; None: skip)."""
        masked = [(i, r.grammar, r.params.max_tokens - len(r.tokens)) for i, r in enumerate(rows)
                  if r is not None and r.grammar is not None and not r.grammar.finished]
        if masked:
            started = time.perf_counter()
            self.grammars.apply(logits, masked)
            self.stats.masks(len(masked), time.perf_counter() - started)

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: list[Request]) -> torch.Tensor | None:
        """:func:`token_logprobs` for every row when any of ``rows`` asks (one kernel chain for the batch)."""
        asked = [r.params.logprobs for r in rows if r.params.logprobs is not None]
        return token_logprobs(logits, tokens, max(asked)) if asked else None

    @staticmethod
    def _to_host(tokens: torch.Tensor, logprobs: torch.Tensor | None = None) -> tuple[Any, ...]:
        """Start copying ``tokens`` (and their ``logprobs``) to the CPU without waiting (pinned
        memory on a GPU); the event marks the copy's end in the stream, so reading waits for
        this step only."""
        if tokens.device.type != "cuda":
            return tokens, logprobs, None
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True).copy_(tokens, non_blocking=True)
        if logprobs is not None:
            logprobs = torch.empty(logprobs.shape, dtype=logprobs.dtype, pin_memory=True).copy_(logprobs, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, logprobs, done

    def _collect(self, rows: list[Request], host: tuple[Any, ...],
                 ended: list[tuple[Request, str, Exception | None]] | None = None) -> None:
        """Take a launched step's tokens (waits for that step only) and advance its rows."""
        tokens, logprobs, done = host
        if done is not None:
            done.synchronize()
        self._advance(rows, tokens.tolist(), ended, None if logprobs is None else logprobs.tolist())

    def _prefill_turn(self) -> None:
        """Spend this turn's ``max_prefill_tokens``: first on the prompt left partly prefilled,
        then on waiting requests, side by side in one forward pass; the last one admitted may get
        only part of its prompt in (the rest goes on next turn, after a decoding step).

        Why a token budget (vLLM's chunked prefill): an H100 prefills a 717-token page in ~22 ms
        of matrix work, and every running row waits for it; with 8 pages arriving at once the
        running rows used to wait for all 8 in one prefill. A budget bounds each pause, so
        running rows keep their inter-token latency and arrivals still join within a few steps.
        """
        budget = self.max_prefill_tokens
        partial = self.prefilling
        if partial is not None:
            if partial.slot != len(self.running):  # rows ended meanwhile: keep the slots packed
                self.decoder.move(partial.slot, len(self.running))
                self.decoder.free(partial.slot)
                partial.slot = len(self.running)
            budget -= self._prefill([partial], partial.prefilled, budget)
            if self.prefilling is not None:
                return
        admitted = self._admit(budget)
        if admitted:
            self._prefill(admitted, 0, budget)

    def _admit(self, budget: int) -> list[Request]:
        """Waiting requests that get a slot this turn (cancelled ones are dropped), each with its
        prompt on the device; one whose prompt cannot be embedded fails alone."""
        admitted: list[Request] = []
        with self._wake:
            while self.waiting and budget > 0 and len(self.running) + len(admitted) < self.decoder.slots:
                head = self.waiting.popleft()
                if head.cancelled:
                    self._resolve(head, "cancelled")
                    continue
                budget -= head.prompt.length
                admitted.append(head)
        now = time.perf_counter()
        ready = []
        for request in admitted:
            request.admitted = now
            if not request.future.set_running_or_notify_cancel():
                request.cancelled = True
                continue
            try:
                if request.prompt.ready is not None:  # its image embeddings, made on the vision stream
                    torch.cuda.current_stream(self.device).wait_event(request.prompt.ready)
                request.row = self.decoder.prompt_row(request.prompt.tensors)
            except Exception as exc:
                log.exception("a prompt could not be embedded")
                self._resolve(request, "error", exc)
                continue
            ready.append(request)
        return ready

    def _prefill(self, requests: list[Request], start: int, budget: int) -> int:
        """Prefill ``requests`` from prompt position ``start`` (0, or a partial prompt's next
        chunk) into the next free slots, ``budget`` tokens in all; returns the tokens prefilled.
        Requests whose prompt is complete start running (their first tokens are read with the
        next step); the last one may stay partial. If the forward pass fails, the requests are
        retried one at a time, so that a bad request fails alone."""
        first = len(self.running)
        stops = []
        for request in requests:
            stops.append(min(request.prompt.length, start + budget))
            budget -= stops[-1] - start
        started = time.perf_counter()
        done = [r for r, stop in zip(requests, stops, strict=True) if stop == r.prompt.length]
        try:
            logits = self.decoder.prefill([r.row for r in requests], first, start, stops)[:len(done)]
            self._constrain(logits, done)
            tokens = choose_tokens(logits, done)
        except Exception as exc:  # every admitted request is answered, with its error if need be
            for slot in range(first, first + len(requests)):
                self.decoder.free(slot)
            self.prefilling = None
            if len(requests) > 1:
                log.warning("prefill of %d requests failed (%s); retrying one by one", len(requests), exc)
                return sum(self._prefill([r], start, stop - start) for r, stop in zip(requests, stops, strict=True))
            log.exception("prefill failed")
            requests[0].row = None
            self._resolve(requests[0], "error", exc)
            return stops[0] - start
        self.decoder.accept(first, tokens)
        for slot, request in enumerate(done, start=first):
            request.slot, request.row, request.prefilled = slot, None, request.prompt.length
            self.running.append(request)
            self.metrics.prompt_tokens(request.prompt.length)
        self.prefilling = None
        if len(done) < len(requests):
            partial = requests[-1]
            partial.slot, partial.prefilled, self.prefilling = first + len(done), stops[-1], partial
        self.stats.prefill(len(requests), sum(stops) - start * len(requests), time.perf_counter() - started)
        if done:
            self._unread.append((done, self._to_host(tokens, self._logprobs(logits, tokens, done))))
        return sum(stops) - start * len(requests)

    def collate(self, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
        """Left-pad the prepared prompts into one batch on the model's device (copied first, from
        pinned memory on a GPU, so the copies do not wait for the step in flight)."""
        width = max(prompt.length for prompt in prompts)
        pad = self.processor.tokenizer.pad_token_id or 0
        batch: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
        for prompt in prompts:
            if prompt.ready is not None:  # its image embeddings, made on the vision stream
                torch.cuda.current_stream(self.device).wait_event(prompt.ready)
            t = {k: v.to(self.device, non_blocking=True) for k, v in prompt.tensors.items()}
            missing = width - prompt.length
            for key, fill in (("input_ids", pad), ("attention_mask", 0), ("mm_token_type_ids", 0)):
                if key in t:
                    batch[key].append(torch.nn.functional.pad(t[key], (missing, 0), value=fill))
            for key in ("pixel_values", "image_grid_thw", "image_embeds"):
                if key in t:
                    batch[key].append(t[key])
        return {key: torch.cat(parts) for key, parts in batch.items()}

    # ---- after each token
    def _advance(self, requests: list[Request], tokens: list[int],
                 ended: list[tuple[Request, str, Exception | None]] | None = None,
                 logprobs: list[list[float]] | None = None) -> None:
        """Append each request's new token (requests that ended meanwhile are skipped) and its
        log-probabilities (rows of :func:`token_logprobs`, when asked), and end the rows that are
        done (or, with ``ended``, list them for the caller to end)."""
        now = time.perf_counter()
        for row, (request, token) in enumerate(zip(requests, tokens, strict=True)):
            if request.slot < 0:  # ended after this step was launched: its token is not part of the answer
                continue
            if logprobs is not None and request.params.logprobs is not None:
                request.logprobs.append(_token_logprob(token, logprobs[row], request.params.logprobs))
            if request.tokens:
                self.metrics.inter_token_latency(now - request.last_token)
            else:
                request.first_token = now
                self.metrics.time_to_first_token(now - request.submitted)
            request.tokens.append(token)
            request.last_token = now
            error = None
            if request.grammar is not None and not request.grammar.accept(token):
                reason, error = "error", RuntimeError(f"token {token} broke the answer's grammar")
            else:
                reason = self._end_reason(request, token)
            if reason and ended is not None:
                ended.append((request, reason, error))
            elif reason:
                self._finish(request, reason, error)

    def _end_reason(self, request: Request, token: int) -> str | None:
        params = request.params
        if token in self.eos_ids and (not params.ignore_eos or request.grammar is not None):  # a grammar ends there
            self._emit(request, final=True)
            return "stop"
        if request.on_text is not None or params.stop:
            if self._emit(request):
                return "stop"
        if len(request.tokens) >= params.max_tokens:
            self._emit(request, final=True)
            return "length"
        return None

    def _emit(self, request: Request, final: bool = False) -> bool:
        """Detokenize what is new (streams, stop strings); True when a stop string appeared.

        Incremental, as TGI and vLLM do it: decode from the previous piece's start, so a
        character spread over several tokens is sent once complete.
        """
        if request.on_text is None and not request.params.stop:
            return False
        decode = self._detokenizer.decode
        before = decode(request.tokens[request._prefix:request._read], skip_special_tokens=True)
        after = decode(request.tokens[request._prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return False
        start = len(request.text)
        request.text += after[len(before):]
        request._prefix, request._read = request._read, len(request.tokens)
        hold = 0
        stopped = False
        for stop in request.params.stop:
            at = request.text.find(stop, max(0, start - len(stop)))
            if at >= 0:
                request.text, stopped = request.text[:at], True
        if request.params.stop and not stopped and not final:
            hold = max(len(s) for s in request.params.stop) - 1  # may be the start of a stop string
        self._send(request, len(request.text) - hold)
        return stopped

    @staticmethod
    def _send(request: Request, upto: int, tokens: int | None = None) -> None:
        """Pass ``text`` up to ``upto`` to a streaming caller (what it has not had yet), with the
        log-probabilities of the tokens decoded since the last piece (up to ``tokens``, default
        those turned into text; text held back for a possible stop string comes later)."""
        if request.on_text is None:
            return
        covered = request._read if tokens is None else tokens
        entries = request.logprobs[request._logprobs_sent:covered]
        if upto > request._sent or entries:
            request.on_text(request.text[request._sent:max(upto, request._sent)], entries)
            request._sent, request._logprobs_sent = max(upto, request._sent), max(covered, request._logprobs_sent)

    def _drop_cancelled(self) -> None:
        for request in [r for r in self.running if r.cancelled]:
            self._finish(request, "cancelled")
        partial = self.prefilling
        if partial is not None and partial.cancelled:
            self.decoder.free(partial.slot)
            partial.slot, partial.row, self.prefilling = -1, None, None
            self._resolve(partial, "cancelled")

    def _finish(self, request: Request, reason: str = "error", error: Exception | None = None) -> None:
        """End ``request``'s row: the last running row moves into its slot (rows stay packed at
        the front of the cache); resolve the request."""
        slot, last = request.slot, self.running[-1]
        if last is not request:
            self.decoder.move(last.slot, slot)
            self.running[slot] = last
            last.slot = slot
        self.running.pop()
        self.decoder.free(len(self.running))
        request.slot = -1
        self._resolve(request, reason, error)

    def _resolve(self, request: Request, reason: str, error: Exception | None = None) -> None:
        self.metrics.request_finished(reason)
        self.metrics.generation_tokens(len(request.tokens))
        if request.future.done():
            return
        if error is not None:
            request.future.set_exception(error)
            return
        if request.params.stop and reason == "stop" and request.text:
            text = request.text
        else:
            text = self._detokenizer.decode(request.tokens, skip_special_tokens=True)
            if request.params.stop:  # a stop string may also end a row that stopped otherwise
                for stop in request.params.stop:
                    text = text.split(stop, 1)[0]
            request.text = text
        self._send(request, len(request.text), len(request.tokens))  # what was held back for a possible stop string
        now = time.perf_counter()
        request.future.set_result(Result(
            text=text, token_ids=list(request.tokens), prompt_tokens=request.prompt.length, finish_reason=reason,
            queue_s=(request.admitted or now) - request.submitted,
            ttft_s=(request.first_token or now) - request.submitted, latency_s=now - request.submitted,
            closed_early=request.grammar is not None and request.grammar.closed_early,
            logprobs=list(request.logprobs) if request.params.logprobs is not None else None))


__all__ = ["MAX_TOP_LOGPROBS", "Engine", "EngineDead", "EngineMetrics", "Overloaded", "Prompt", "PromptTooLong", "Request",
           "Result", "SamplingParams", "TokenLogprob"]
