"""Starting a local Ray for `lossd quality --ray`: a node that misses Ray's own start-up deadline on a busy machine
is tried again (a CI run failed on it once); a cluster address that does not answer is reported, not retried."""

import pytest

from lossd.quality import job
from lossd.quality.readers import InputError


class FakeRay:
    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, []

    def init(self, **kw):
        self.calls.append(("init", kw.get("address")))
        if len([c for c in self.calls if c[0] == "init"]) <= self.failures:
            raise RuntimeError("Failed to get node info b'GCS cannot find the node'\nmore Ray text")

    def shutdown(self):
        self.calls.append(("shutdown", None))


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    monkeypatch.setattr(job.time, "sleep", lambda s: None)


def test_a_local_node_that_did_not_come_up_is_tried_again(capsys):
    ray = FakeRay(failures=1)
    job._start_ray(ray, None)
    assert ray.calls == [("init", None), ("shutdown", None), ("init", None)]
    assert "Ray did not start (RuntimeError); trying again (2 of 3)" in capsys.readouterr().err


def test_a_local_ray_that_never_starts_is_one_input_error():
    ray = FakeRay(failures=5)
    with pytest.raises(InputError, match=r"--ray: Ray did not start: Failed to get node info") as info:
        job._start_ray(ray, None)
    assert "more Ray text" not in str(info.value)
    assert [c for c in ray.calls if c[0] == "init"] == [("init", None)] * job.RAY_START_TRIES


def test_a_cluster_address_is_not_retried():
    ray = FakeRay(failures=1)
    with pytest.raises(InputError, match="Ray did not start at 10.0.0.1:6379"):
        job._start_ray(ray, "10.0.0.1:6379")
    assert [c for c in ray.calls if c[0] == "init"] == [("init", "10.0.0.1:6379")]
