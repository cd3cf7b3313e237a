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
