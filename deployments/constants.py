"""Defaults in one place, with their units in their names."""

DEFAULT_CONTEXT_SIZE = 2048
DEFAULT_BATCH_TOKENS = 512  # llama.cpp tokens per decode step (its n_ubatch default)
DEFAULT_PROMPT_CACHE_MIB = 1024  # host memory per replica for cached prompts' KV (llama-server: 8192)
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40

# Deadlines (nika's runtime used a 30 s per-chunk stream timeout and a 5 min inference timeout).
DEFAULT_FIRST_CHUNK_TIMEOUT_S = 60.0
DEFAULT_CHUNK_TIMEOUT_S = 30.0
DEFAULT_REQUEST_TIMEOUT_S = 300.0
MAX_FIRST_CHUNK_TIMEOUT_S = 600.0
MAX_CHUNK_TIMEOUT_S = 300.0
MAX_REQUEST_TIMEOUT_S = 3600.0

# Streaming: tokens generated within this interval of the last chunk go out together in the
# next one (the first token never waits). Ray Serve LLM coalesces on a fixed 50 ms interval.
DEFAULT_STREAM_INTERVAL_S = 0.05
MAX_STREAM_INTERVAL_S = 1.0

# Health: longest silence of an engine that holds work before Serve restarts the replica.
DEFAULT_STALL_TIMEOUT_S = 60.0

# Serve options (see replica.model_deployment_options and router.router_deployment_options);
# each engine sets its own max_ongoing_requests and autoscaling target (engines.base.Engine).
DEFAULT_MODEL_MAX_QUEUED_REQUESTS = 64
DEFAULT_ROUTER_MAX_ONGOING_REQUESTS = 256
DEFAULT_ROUTER_MAX_QUEUED_REQUESTS = 1024
RETRY_AFTER_S = 1
# A model that fails to load fails fast (its reason shows in serve status and /v1/models),
# instead of Serve's default 20 attempts.
DEFAULT_MODEL_MAX_CONSTRUCTOR_RETRY_COUNT = 3

# Ray Serve's streaming data path, in the environment of the router and vLLM replicas (part of
# Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED, without its direct-ingress change of the HTTP path):
# user code and the handle router on the replica's own event loop instead of extra threads.
# With gRPC streams (serving.core) this halves the router's and the vLLM replica's CPU
# time per streamed chunk. Not for llama.cpp replicas (engines.engine_env says why).
SERVE_DATA_PATH_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}

# Environment of every Ray node, set where Ray starts (`ray start`, or the local Ray of `serve run`,
# the tests and the benchmarks), since Serve's HTTP proxy reads it at startup: the proxy streams
# the router's response over gRPC instead of one Ray object per chunk. Measured on 2 cores, vision
# at concurrency 8: 511-572 -> 747-998 output tokens/s. The Makefile and cluster/ carry copies,
# kept equal by tests/unit/test_cluster_files.py.
CLUSTER_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1"}

# The Ray that starts on this one machine (`make serve`, the tests, the benchmarks) adds Serve's
# direct ingress: each router replica also serves HTTP itself, on the lowest free port from
# DIRECT_INGRESS_PORT, beside the proxy's port. That skips the proxy process, ~8 ms of CPU per
# request and a wake-up per streamed chunk that compete with the engine's threads for the same
# cores (benchmarks/README.md, "Where the time goes"). Ports are reused at once (no quarantine)
# and a removed router drains for 1 s, not 30 s: nothing in front of them (a load balancer) must
# first learn that a port went away. A cluster keeps CLUSTER_ENV: a port per router replica is
# no address to publish (direct_ingress.py says more).
DIRECT_INGRESS_PORT = 30000  # Serve's default start of that range
LOCAL_ENV = CLUSTER_ENV | {
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(DIRECT_INGRESS_PORT),
    "RAY_SERVE_PORT_QUARANTINE_S": "0",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
}

# Replicas publish their engine's counters (batch size, KV-cache usage, ...) this often.
METRICS_INTERVAL_S = 1.0

# Control calls (model info) from the router to replicas must not hang /v1/models.
MODEL_INFO_TIMEOUT_S = 5.0

# Request limits (images are inline, so bodies can be large).
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
DEFAULT_MAX_MESSAGES = 256
DEFAULT_MAX_CHOICES = 8  # each one is a sequence in an engine
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per /v1/embeddings call

# Vision.
DEFAULT_KV_CACHE_BYTES = 256 * 2**20
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's own default for a whole GPU
DEFAULT_MAX_IMAGES = 4
DEFAULT_MAX_IMAGE_BYTES = 10 * 2**20
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
DEFAULT_IMAGE_FETCH_TIMEOUT_S = 5.0
# PagedAttention block sizes: vLLM's CPU attention needs multiples of 32 (16 fails).
BLOCK_SIZE_MULTIPLE = {"cpu": 32, "cuda": 16}

# The Batch API (deployments/batch): OpenAI's limits per input file, and the runner's pace.
DEFAULT_BATCH_DIR = ".batches"  # SQLite state and file contents, relative to the working dir
MAX_BATCH_FILE_BYTES = 200 * 2**20  # OpenAI's limit for a batch input file
MAX_BATCH_REQUESTS = 50_000  # OpenAI's limit of requests per batch
BATCH_COMPLETION_WINDOW_S = 24 * 3600  # "24h", the only window OpenAI offers
BATCH_LINE_ATTEMPTS = 4  # a line failing with a retryable error (overloaded, replica died) runs again
BATCH_RETRY_BACKOFF_S = 1.0  # doubled per attempt
BACKGROUND_PREFILLS_WINDOW_S = 5.0  # background_prefills bounds batch lines this long after an interactive request
