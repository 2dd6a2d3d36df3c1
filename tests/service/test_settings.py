"""Settings from LLMEMB_* variables: comma-separated keys, a keys file, typed limits, the no-auth policy, where the
recommend path runs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings, SettingsError, is_loopback


def test_environment_is_read_with_the_prefix(monkeypatch, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# comment\nfile-key-12345678\n\n")
    monkeypatch.setenv("LLMEMB_API_KEYS", "key-one-12345678, key-two-12345678,")
    monkeypatch.setenv("LLMEMB_API_KEYS_FILE", str(keys))
    monkeypatch.setenv("LLMEMB_ARTIFACTS", str(tmp_path / "art"))
    monkeypatch.setenv("LLMEMB_RECOMMEND_MAX_QUEUE", "7")
    monkeypatch.setenv("LLMEMB_INDEX_KIND", "ivf")
    monkeypatch.setenv("LLMEMB_METRICS_REQUIRE_AUTH", "true")
    s = Settings()
    assert s.api_keys == ["key-one-12345678", "key-two-12345678", "file-key-12345678"] and s.auth_enabled
    assert s.artifacts == tmp_path / "art" and s.overlays_root == tmp_path / "art" / "overlays"
    assert s.recommend_max_queue == 7 and s.index_kind == "ivf" and s.metrics_require_auth
    monkeypatch.setenv("LLMEMB_INDEX_KIND", "annoy")
    with pytest.raises(ValidationError, match="index_kind"):
        Settings()


def test_no_keys_is_allowed_only_on_loopback_or_explicitly():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5")
    Settings(host="127.0.0.1").check_auth()
    Settings(host="0.0.0.0", api_keys="a-long-enough-key").check_auth()
    Settings(host="0.0.0.0", allow_no_auth=True).check_auth()
    with pytest.raises(SettingsError, match="LLMEMB_ALLOW_NO_AUTH"):
        Settings(host="0.0.0.0").check_auth()
    with pytest.raises(ValidationError, match="at least 8"):
        Settings(api_keys="short")
    with pytest.raises(ValidationError):
        Settings(max_k=0)


def test_the_embed_worker_is_a_process_on_cuda_unless_set(monkeypatch):
    s = Settings()
    assert s.embed_worker == "auto"
    assert s.embed_worker_mode(cuda=False) == "thread" and s.embed_worker_mode(cuda=True) == "process"
    monkeypatch.setenv("LLMEMB_EMBED_WORKER", "thread")
    assert Settings().embed_worker_mode(cuda=True) == "thread"
    monkeypatch.setenv("LLMEMB_EMBED_WORKER", "process")
    assert Settings().embed_worker_mode(cuda=False) == "process"
    monkeypatch.setenv("LLMEMB_EMBED_WORKER", "fork")
    with pytest.raises(ValidationError, match="embed_worker"):
        Settings()


def test_the_recommend_worker_is_a_process_with_two_cores_or_on_cuda_unless_set(monkeypatch):
    from service import settings as settings_module

    s = Settings()
    assert s.recommend_worker == "auto"
    monkeypatch.setattr(settings_module, "usable_cores", lambda: 1)
    assert s.recommend_worker_mode(cuda=False) == "thread" and s.recommend_worker_mode(cuda=True) == "process"
    monkeypatch.setattr(settings_module, "usable_cores", lambda: 2)
    assert s.recommend_worker_mode(cuda=False) == "process"
    monkeypatch.setenv("LLMEMB_RECOMMEND_WORKER", "thread")
    assert Settings().recommend_worker_mode(cuda=True) == "thread"
    monkeypatch.setenv("LLMEMB_RECOMMEND_WORKER", "process")
    monkeypatch.setattr(settings_module, "usable_cores", lambda: 1)
    assert Settings().recommend_worker_mode(cuda=False) == "process"
    monkeypatch.setenv("LLMEMB_RECOMMEND_WORKER", "fork")
    with pytest.raises(ValidationError, match="recommend_worker"):
        Settings()


def test_serve_threads_leave_the_loop_a_core_and_stay_few_on_cuda(monkeypatch):
    from service import settings as settings_module
    from service.settings import CUDA_SERVE_THREADS, serve_threads

    monkeypatch.setattr(settings_module, "usable_cores", lambda: 64)
    monkeypatch.setattr(settings_module, "_cuda_available", lambda: False)
    assert serve_threads("cpu") == serve_threads("auto") == 63
    assert serve_threads("cuda") == CUDA_SERVE_THREADS < 63
    monkeypatch.setattr(settings_module, "_cuda_available", lambda: True)
    assert serve_threads("auto") == CUDA_SERVE_THREADS and serve_threads("cpu") == 63
    monkeypatch.setattr(settings_module, "usable_cores", lambda: 2)
    assert serve_threads("cuda") == serve_threads("cpu") == 1
