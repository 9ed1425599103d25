"""A REAL Triton Inference Server serving ``deploy/triton/model_repository`` (``blip_itm``).

The ``tritonserver`` binary and its Python backend come from the ``nvidia-pytriton`` wheel, in
the side venv ``deploy/triton/setup-env.sh`` builds (``.venv-triton``, or
``HOIDISTILL_TRITON_VENV``). It is built here when missing (about 5 minutes, once; then reused)
and the server is started with ``deploy/triton/tritonserver.sh``, exactly as the docs say. The
model loads the tiny random BLIP of the ``tiny_blip_dir`` fixture through ``HOIDISTILL_MODEL``;
its scores must equal the engine's, run here in the main venv, to 1e-5.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from PIL import Image
from testkit import REPO
from testkit.servers import free_port
from testkit.teacher import LONG_SENTENCE, png_bytes
from tritonclient.utils import InferenceServerException

from teacher_server.client import TeacherRpcError
from teacher_server.engine import ImageSentences, ItmEngine
from teacher_server.hoi.region import Region
from teacher_server.triton_client import TritonTeacherClient

torch.set_num_threads(1)
pytestmark = pytest.mark.slow

SETUP = REPO / "deploy" / "triton" / "setup-env.sh"
LAUNCH = REPO / "deploy" / "triton" / "tritonserver.sh"
VENV = Path(os.environ.get("HOIDISTILL_TRITON_VENV", REPO / ".venv-triton"))
MODEL = "blip_itm"
START_TIMEOUT_S = 300.0
BUILD_TIMEOUT_S = 1800.0
# Small limits, so that the tests can cross them with small inputs.
LIMITS = {"HOIDISTILL_MAX_SENTENCE_TOKENS": "16", "HOIDISTILL_MAX_IMAGE_PIXELS": "10000"}


# ------------------------------------------------------------------------------------ the server
def ensure_triton_env() -> Path:
    """The side venv with tritonserver, built by deploy/triton/setup-env.sh when missing."""
    if not (VENV / ".installed").is_file():
        # Same interpreter as this venv's, so the backend stub matches the packages' Python.
        python = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
        result = subprocess.run(
            [str(SETUP), str(VENV)],
            env={**os.environ, "PYTHON": str(python)},
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(f"{SETUP} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return VENV


@dataclass
class TritonServer:
    """A running tritonserver process and its loopback ports."""

    process: subprocess.Popen
    grpc_port: int
    http_port: int
    metrics_port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_triton(model_dir: Path, workdir: Path, env: dict[str, str]) -> TritonServer:
    """Start ``deploy/triton/tritonserver.sh`` on free loopback ports (does not wait for readiness)."""
    ports = free_port(), free_port(), free_port()
    log_path = workdir / f"tritonserver-{ports[0]}.log"
    command = [
        str(LAUNCH),
        f"--grpc-port={ports[0]}",
        f"--http-port={ports[1]}",
        f"--metrics-port={ports[2]}",
        "--grpc-address=127.0.0.1",
        "--http-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
        "--exit-timeout-secs=10",
    ]
    server_env = {
        **os.environ,
        "HOIDISTILL_TRITON_VENV": str(VENV),
        "HOIDISTILL_MODEL": str(model_dir),
        "HOIDISTILL_DTYPE": "fp32",
        **env,
    }
    with log_path.open("wb") as log:
        # A session of its own: the backend stubs are its children; teardown stops them all.
        process = subprocess.Popen(
            command, env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return TritonServer(process, *ports, log_path)


def stop_triton(server: TritonServer) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=30)


def wait_ready(server: TritonServer) -> None:
    client = triton.InferenceServerClient(url=server.target)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                pytest.fail(f"tritonserver exited with {server.process.returncode}:\n{server.log()[-4000:]}")
            try:
                if client.is_server_ready() and client.is_model_ready(MODEL):
                    return
            except InferenceServerException:
                pass  # not listening yet
            time.sleep(0.5)
        pytest.fail(f"tritonserver not ready after {START_TIMEOUT_S:.0f} s:\n{server.log()[-4000:]}")
    finally:
        client.close()


@contextmanager
def running_triton(model_dir: Path, workdir: Path, env: dict[str, str]) -> Iterator[TritonServer]:
    ensure_triton_env()
    server = start_triton(model_dir, workdir, env)
    try:
        wait_ready(server)
        yield server
    finally:
        stop_triton(server)


@pytest.fixture(scope="module")
def server(tiny_blip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    with running_triton(tiny_blip_dir, tmp_path_factory.mktemp("triton"), LIMITS) as running:
        yield running


@pytest.fixture
def client(server: TritonServer) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=server.target)
    yield client
    client.close()


# ---------------------------------------------------------------------------------------- helpers
def pair_inputs(images: list[bytes], texts: list[bytes | str]) -> list[triton.InferInput]:
    """IMAGE and TEXT as [N, 1] BYTES, the shape scheme of deploy/triton's config.pbtxt."""
    inputs = []
    for name, values in (("IMAGE", images), ("TEXT", [t.encode() if isinstance(t, str) else t for t in texts])):
        array = np.empty(len(values), dtype=np.object_)
        array[:] = values
        tensor = triton.InferInput(name, [len(values), 1], "BYTES")
        tensor.set_data_from_numpy(array.reshape(-1, 1))
        inputs.append(tensor)
    return inputs


def engine_pairs(engine: ItmEngine, images: list[bytes], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(probs, logits) of pair i = (images[i], texts[i]) from the engine, each pair on its own."""
    probs, logits = [], []
    for image, text in zip(images, texts, strict=True):
        prepared = engine.prepare_image(image)
        score = engine.score([ImageSentences(prepared.digest, prepared, [text])])[0][0]
        probs.append(score.match_prob)
        logits.append(score.match_logit)
    return np.array(probs), np.array(logits)


def counter(server: TritonServer, name: str) -> float:
    """Sum over instances of the custom counter ``hoidistill_teacher_<name>_total`` of blip_itm."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    pattern = re.compile(rf'^hoidistill_teacher_{name}_total\{{[^}}]*model="{MODEL}"[^}}]*\}} (\S+)$', re.M)
    values = [float(value) for value in pattern.findall(text)]
    assert values, f"no hoidistill_teacher_{name}_total sample for {MODEL} in the metrics"
    return sum(values)


def big_png(width: int, height: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def infer_error(client: triton.InferenceServerClient, inputs: list[triton.InferInput]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, inputs)
    return caught.value


# ------------------------------------------------------------------------------------------ tests
def test_triton_serves_blip_itm_from_the_repository(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL, "1")
    metadata = client.get_model_metadata(MODEL, as_json=True)
    assert metadata["versions"] == ["1"]
    tensors = {t["name"]: (t["datatype"], t["shape"]) for t in [*metadata["inputs"], *metadata["outputs"]]}
    assert tensors == {
        "IMAGE": ("BYTES", ["-1", "1"]),
        "TEXT": ("BYTES", ["-1", "1"]),
        "REGION": ("FP32", ["-1", "8"]),
        "MATCH_PROB": ("FP32", ["-1", "1"]),
        "MATCH_LOGIT": ("FP32", ["-1", "1"]),
    }
    config = client.get_model_config(MODEL, as_json=True)["config"]
    assert config["backend"] == "python"
    assert config["max_batch_size"] == 256
    assert "dynamic_batching" in config
    optional = {tensor["name"]: tensor.get("optional", False) for tensor in config["input"]}
    assert optional == {"IMAGE": False, "TEXT": False, "REGION": True}


def test_probabilities_equal_the_engine_and_a_repeated_image_is_encoded_once(server, client, engine) -> None:
    horse, cup = png_bytes(401), png_bytes(402)  # seeds no other test uses: not in the vision LRU
    images = [horse, cup, horse, horse, horse]
    texts = ["a person ride a horse", "a person hold a cup", "a person feed a horse", "a person ride a horse", "é"]
    encoded, scored = counter(server, "images_encoded"), counter(server, "sentences_scored")
    requested = counter(server, "pairs_requested")
    result = client.infer(MODEL, pair_inputs(images, texts))
    probs, logits = result.as_numpy("MATCH_PROB"), result.as_numpy("MATCH_LOGIT")
    assert probs.shape == logits.shape == (5, 1)
    assert probs.dtype == logits.dtype == np.float32
    expected_probs, expected_logits = engine_pairs(engine, images, texts)
    np.testing.assert_allclose(probs[:, 0], expected_probs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[:, 0], expected_logits, atol=1e-5, rtol=0)
    assert counter(server, "images_encoded") - encoded == 2  # horse once, though in four pairs
    assert counter(server, "pairs_requested") - requested == 5
    assert counter(server, "sentences_scored") - scored == 4  # the repeated pair once
    # Again: both images are in the vision LRU now.
    client.infer(MODEL, pair_inputs([horse, cup], ["a person pet a horse", "a person wash a cup"]))
    assert counter(server, "images_encoded") - encoded == 2


# Inside png_bytes' 40 x 32 images; the unions grown by the crop margin are far from the whole image.
PAIR_A = Region(human=(2.0, 3.0, 14.0, 20.0), object=(10.0, 8.0, 20.0, 26.0))
PAIR_B = Region(human=(20.0, 2.0, 36.0, 18.0), object=(24.0, 12.0, 38.0, 30.0))


def region_input(regions: list[Region | None]) -> triton.InferInput:
    """REGION [N, 8] FP32; a row of zeros for the whole image."""
    rows = np.array([region.values() if region else (0.0,) * 8 for region in regions], dtype=np.float32)
    tensor = triton.InferInput("REGION", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    return tensor


def test_region_rows_score_the_pairs_as_the_engine(server, client, engine) -> None:
    image, text = png_bytes(405), "a person ride a horse"
    regions = [PAIR_A, PAIR_B, None, PAIR_A]
    encoded = counter(server, "images_encoded")
    result = client.infer(MODEL, [*pair_inputs([image] * 4, [text] * 4), region_input(regions)])
    probs = result.as_numpy("MATCH_PROB")[:, 0]
    assert counter(server, "images_encoded") - encoded == 3  # three views of one image
    for index, region in enumerate(regions):
        prepared = engine.prepare_image(image, region=region)
        expected = engine.score([ImageSentences(prepared.digest, prepared, [text], region=region)])[0][0]
        assert probs[index] == pytest.approx(expected.match_prob, abs=1e-5)
    assert len({float(p) for p in probs[:3]}) == 3 and probs[3] == probs[0]
    # The same through the client, which sends REGION when a region is given.
    with TritonTeacherClient(f"triton://{server.target}", timeout_s=120) as teacher:
        (pair,), (whole,) = teacher.score([image, image], [[text], [text]], regions=[PAIR_B, None])
    assert (pair.match_prob, whole.match_prob) == pytest.approx((probs[1], probs[2]), abs=1e-6)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ((9, 1, 5, 5, 1, 1, 5, 5), ["REGION[0][0:4]", "inverted"]),
        ((1, 1, 5, 5, 1, 1, 60, 20), ["REGION[0][6]", "outside the image"]),
    ],
    ids=["inverted", "outside"],
)
def test_bad_region_is_refused_naming_the_row(client, row, expected) -> None:
    rows = triton.InferInput("REGION", [1, 8], "FP32")
    rows.set_data_from_numpy(np.array([row], dtype=np.float32))
    error = infer_error(client, [*pair_inputs([png_bytes(406)], ["a person ride a horse"]), rows])
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    for part in expected:
        assert part in error.message()


def test_only_the_requested_outputs_come_back(client) -> None:
    result = client.infer(
        MODEL,
        pair_inputs([png_bytes(403)], ["a person ride a horse"]),
        outputs=[triton.InferRequestedOutput("MATCH_LOGIT")],
    )
    assert [output.name for output in result.get_response().outputs] == ["MATCH_LOGIT"]


def test_concurrent_requests_each_get_their_own_answer(server, engine) -> None:
    """Requests the dynamic batcher may merge into one execute: a bad one fails alone."""
    shared = png_bytes(410)
    requests = [([shared, png_bytes(411 + i)], [f"a person ride a horse {i}", "a person hold a cup"]) for i in range(5)]
    requests.insert(2, ([shared], [LONG_SENTENCE]))
    answers: dict[int, object] = {}

    def send(index: int) -> None:
        client = triton.InferenceServerClient(url=server.target)
        try:
            answers[index] = client.infer(MODEL, pair_inputs(*requests[index])).as_numpy("MATCH_PROB")[:, 0]
        except InferenceServerException as exc:
            answers[index] = exc
        finally:
            client.close()

    threads = [threading.Thread(target=send, args=(index,)) for index in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    failure = answers[2]
    assert isinstance(failure, InferenceServerException)
    assert failure.status() == "StatusCode.INVALID_ARGUMENT" and "TEXT[0]" in failure.message()
    for index, (images, texts) in enumerate(requests):
        if index != 2:
            np.testing.assert_allclose(answers[index], engine_pairs(engine, images, texts)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("images", "texts", "expected"),
    [
        ([png_bytes(420), b""], ["a person ride a horse", "x"], ["IMAGE[1]", "image is empty (0 bytes)"]),
        ([b"not an image"], ["a person ride a horse"], ["IMAGE[0]", "not a decodable image file"]),
        ([big_png(200, 100)], ["a person ride a horse"], ["IMAGE[0]", "20,000 pixels", "limit of 10,000 pixels"]),
        ([png_bytes(421)] * 2, ["a person ride a horse", LONG_SENTENCE], ["TEXT[1]", "over the limit of 16 tokens"]),
        ([png_bytes(422)], ["   "], ["TEXT[0]", "sentence is empty"]),
        ([png_bytes(423)], [b"\xff\xfeabc"], ["TEXT[0]", "not valid UTF-8"]),
        ([png_bytes(424)] * 257, ["a person ride a horse"] * 257, ["batch-size must be <= 256"]),
    ],
    ids=[
        "empty-image",
        "not-an-image",
        "too-many-pixels",
        "too-many-tokens",
        "empty-text",
        "bad-utf8",
        "too-many-pairs",
    ],
)
def test_bad_input_is_refused_naming_the_element_and_the_limit(client, images, texts, expected) -> None:
    error = infer_error(client, pair_inputs(images, texts))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    for part in expected:
        assert part in error.message()
    # The instance lives on.
    assert client.infer(MODEL, pair_inputs([png_bytes(425)], ["a person ride a horse"])).as_numpy(
        "MATCH_PROB"
    ).shape == (1, 1)


def test_triton_teacher_client_scores_through_triton(server, engine, tmp_path) -> None:
    horse, cup = png_bytes(430), png_bytes(431)
    path = tmp_path / "horse.png"
    path.write_bytes(horse)
    sentences = [
        ["a person ride a horse", "a person feed a horse", "a person ride a horse"],
        ["a person hold a cup"],
        [],
    ]
    # pairs_per_request=2: the call becomes several requests in flight at once.
    with TritonTeacherClient(f"triton://{server.target}", pairs_per_request=2, timeout_s=120) as teacher:
        scores = teacher.score([path, cup, horse], sentences)
    assert [len(group) for group in scores] == [3, 1, 0]
    for image, group, answer in ((horse, sentences[0], scores[0]), (cup, sentences[1], scores[1])):
        expected_probs, expected_logits = engine_pairs(engine, [image] * len(group), group)
        np.testing.assert_allclose([s.match_prob for s in answer], expected_probs, atol=1e-5, rtol=0)
        np.testing.assert_allclose([s.match_logit for s in answer], expected_logits, atol=1e-5, rtol=0)
    assert not any(score.cached for group in scores for score in group)


def test_triton_teacher_client_raises_the_servers_error(server) -> None:
    with TritonTeacherClient(f"triton://{server.target}") as teacher, pytest.raises(TeacherRpcError) as caught:
        teacher.score([png_bytes(432)], [["a person ride a horse", LONG_SENTENCE]])
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "TEXT[1]" in caught.value.details and "over the limit of 16 tokens" in caught.value.details


def test_model_info_names_the_loaded_model_only_through_the_metrics(server, engine, tiny_blip_dir) -> None:
    with TritonTeacherClient(server.target, metrics_url=server.metrics_url) as teacher:
        info = teacher.model_info()
    assert info.ready and info.model_name == MODEL and info.version == "1" and info.max_batch_size == 256
    assert info.fingerprint == engine.fingerprint
    assert (info.model_id, info.dtype, info.itm_start_token) == (str(tiny_blip_dir), "fp32", "cls")
    assert info.limits["max_sentence_tokens"] == 16 and info.limits["max_image_pixels"] == 10000
    assert info.limits["max_pairs_per_request"] == 256
    assert [instance["device"] for instance in info.instances] == ["cpu"]
    # Without the metrics: what config.pbtxt says, which HOIDISTILL_* variables overrode.
    with TritonTeacherClient(server.target) as teacher:
        configured = teacher.model_info()
    assert configured.fingerprint is None
    assert configured.model_id == "Salesforce/blip-itm-base-coco"
    assert configured.limits["max_sentence_tokens"] == 64 and configured.dtype == "auto"


def test_a_bad_setting_fails_the_model_load_with_its_name(tiny_blip_dir, tmp_path) -> None:
    ensure_triton_env()
    server = start_triton(tiny_blip_dir, tmp_path, {"HOIDISTILL_MAX_IMAGE_BYTES": "lots"})
    try:
        server.process.wait(timeout=START_TIMEOUT_S)  # a model that fails to load stops the server
    finally:
        stop_triton(server)
    assert server.process.returncode != 0
    assert "environment variable HOIDISTILL_MAX_IMAGE_BYTES = 'lots': expected an integer >= 1" in server.log()
