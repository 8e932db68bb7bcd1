"""Names a client or an operator chooses and the service reuses: a run id becomes a folder name,
a request id goes into headers and log lines. Only plain ones are taken, whole."""

import pytest

from service.mlflow_store import FetchError, check_run_id
from service.observability import new_request_id


@pytest.mark.parametrize("run_id", ["0123456789abcdef0123456789abcdef", "a", "run_2-b"])
def test_a_plain_run_id_is_taken(run_id):
    check_run_id(run_id)


@pytest.mark.parametrize("run_id", ["abc\n", "abc\r\n", "\nabc", "", "-abc", "../abc", "a/b", "a b", "a" * 257, None])
def test_any_other_run_id_is_refused(run_id):
    with pytest.raises(FetchError, match="not an MLflow run id"):
        check_run_id(run_id)


@pytest.mark.parametrize("sent", ["client-7f3a.42", "a", "x" * 128])
def test_a_plain_request_id_is_kept(sent):
    assert new_request_id(sent) == sent


@pytest.mark.parametrize("sent", ["abc\n", "abc\r\n", "x" * 129, "a b", ""])
def test_any_other_request_id_is_replaced(sent):
    assert new_request_id(sent) != sent
