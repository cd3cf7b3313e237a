"""app_status.report sorts the applications a deploy submitted by what
Serve's status (its own schema objects) says of them."""

import pytest
from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger
from ray.serve.schema import (ApplicationStatus, ApplicationStatusOverview,
                              DeploymentStatusOverview, ServeStatus)

from splitserve.cluster.serve.app_status import DeployFailed, report


def _app(status: ApplicationStatus, message: str = "", deployment_message: str = ""):
    dep = DeploymentStatusOverview(status=DeploymentStatus.UPDATING,
                                   status_trigger=DeploymentStatusTrigger.CONFIG_UPDATE_STARTED,
                                   replica_states={}, message=deployment_message)
    return ApplicationStatusOverview(status=status, message=message, last_deployed_time_s=0.0,
                                     deployments={"Worker": dep})


def test_running_failed_starting_and_missing():
    st = ServeStatus(applications={
        "m-prefill": _app(ApplicationStatus.RUNNING),
        "m-decode": _app(ApplicationStatus.DEPLOY_FAILED, "replica constructor raised",
                         "The deployment failed to start 3 times in a row. Error: bad header"),
        "ingress": _app(ApplicationStatus.DEPLOYING,
                        deployment_message="waiting for resources {'CPU': 64.0}"),
    })
    got = report(st, ["m-prefill", "m-decode", "ingress", "gone"])
    assert got.failed == {
        "m-decode": "DEPLOY_FAILED: replica constructor raised | Worker: The deployment failed "
                    "to start 3 times in a row. Error: bad header",
        "gone": "Serve does not list it (deleted while it deployed?)",
    }
    assert got.starting == {"ingress": "DEPLOYING: Worker: waiting for resources {'CPU': 64.0}"}
    with pytest.raises(DeployFailed, match=r"application 'm-decode' failed to deploy: "
                                           r"DEPLOY_FAILED: replica constructor raised.*"
                                           r"application 'gone' failed to deploy"):
        got.raise_failed()


def test_all_running_is_empty():
    got = report(ServeStatus(applications={"a": _app(ApplicationStatus.RUNNING)}), ["a"])
    assert not got.failed and not got.starting
    got.raise_failed()  # nothing to raise


def test_a_constructor_traceback_is_cut_to_the_exception_it_raised():
    # Serve's deployment message for a replica whose constructor raised: its
    # summary, then the replica wrapper's traceback (as Serve writes it)
    message = (
        "The deployment failed to start 6 times in a row. This may be due to a problem with "
        "its constructor or initial health check failing. See controller logs for details. "
        "Error:\n\x1b[36mray::ServeReplica:ingress:ingress.initialize_and_get_metadata()"
        "\x1b[39m (pid=1, ip=10.0.0.1)\n"
        '  File "ray/serve/_private/replica.py", line 1928, in initialize\n'
        "    raise RuntimeError(traceback.format_exc()) from None\n"
        "RuntimeError: Traceback (most recent call last):\n"
        '  File "cluster/serve/ingress.py", line 84, in __init__\n'
        "    self.http_server = await start_http_server(\n"
        "                       ^^^^^^^^^^^^^^^^^^^^^^^^\n"
        "OSError: [Errno 98] the OpenAI HTTP API cannot listen on 127.0.0.1:8000 "
        "(endpoints.host / endpoints.http_port): another process holds it\n")
    got = report(ServeStatus(applications={
        "ingress": _app(ApplicationStatus.DEPLOY_FAILED, deployment_message=message)}),
        ["ingress"])
    assert got.failed == {"ingress": (
        "DEPLOY_FAILED: Worker: The deployment failed to start 6 times in a row. This may be "
        "due to a problem with its constructor or initial health check failing. See controller "
        "logs for details. Error: OSError: [Errno 98] the OpenAI HTTP API cannot listen on "
        "127.0.0.1:8000 (endpoints.host / endpoints.http_port): another process holds it")}
