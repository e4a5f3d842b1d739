"""The `tierwise operator` and `tierwise webhook` commands: their arguments, and mains that import the
operator (kopf, kubernetes_asyncio, cryptography) only when one of them runs, so `tierwise gateway`
and `tierwise sidecar` never load it (tens of MiB a sidecar does not need)."""

from __future__ import annotations

import argparse
import os

from tierwise.compiler import DEFAULT_PLATFORM_NAMESPACE
from tierwise.naming import DEFAULT_SIDECAR_IMAGE


def operator_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kubeconfig", help="kubeconfig to use (default: $KUBECONFIG, else the in-cluster service account)")
    p.add_argument(
        "--platform-namespace",
        default=os.environ.get("TIERWISE_PLATFORM_NAMESPACE", DEFAULT_PLATFORM_NAMESPACE),
        help="namespace whose objects may govern other namespaces (where tierwise is installed)",
    )
    p.add_argument(
        "--prometheus-url",
        default=os.environ.get("TIERWISE_PROMETHEUS_URL"),
        help="Prometheus that scrapes the sidecars: autoscaling signals and SLO status",
    )
    p.add_argument(
        "--sidecar-image",
        default=os.environ.get("TIERWISE_SIDECAR_IMAGE", DEFAULT_SIDECAR_IMAGE),
        help="image of the sidecar put in front of self-hosted model servers (backend.deployment.sidecar)",
    )
    p.add_argument("--health-port", type=int, default=8081, help="port of /healthz, /readyz and /metrics")
    p.add_argument("--autoscale-interval", type=float, default=15.0, help="seconds between autoscaler passes")
    p.add_argument("--slo-interval", type=float, default=30.0, help="seconds between SLO observations")
    p.add_argument(
        "--steering-hold",
        type=float,
        default=300.0,
        help="seconds SLO steering stays in force while Prometheus cannot be read, before the declared weights return",
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("TIERWISE_REDIS_URL"),
        help="the Redis the sidecars count budgets in: budget spend is read there (else from Prometheus). "
        "Pass a URL with a password through the environment, not the command line",
    )
    p.add_argument(
        "--spend-interval", type=float, default=30.0, help="seconds between reads of budget spend and cache statistics"
    )


def webhook_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--kubeconfig", help="kubeconfig to use (default: in-cluster service account, or $KUBECONFIG)")
    p.add_argument("--host", default="", help="address to listen on (default: every interface, IPv4 and IPv6)")
    p.add_argument(
        "--drain-seconds", type=float, default=5.0, help="on SIGTERM, keep answering this long while unready"
    )
    p.add_argument("--port", type=int, default=9443, help="TLS port of /mutate and /validate")
    p.add_argument("--health-port", type=int, default=8081, help="plain-HTTP port of /healthz, /readyz, /metrics")
    p.add_argument(
        "--platform-namespace",
        default=env("TIERWISE_PLATFORM_NAMESPACE", DEFAULT_PLATFORM_NAMESPACE),
        help="namespace whose objects may govern others (as the operator's)",
    )
    p.add_argument("--sidecar-image", default=env("TIERWISE_SIDECAR_IMAGE", DEFAULT_SIDECAR_IMAGE))
    p.add_argument(
        "--unknown-tiers",
        choices=["deny", "warn"],
        default="deny",
        help="a reference to a tier that does not exist: refuse it, or admit it with a warning (GitOps order)",
    )
    p.add_argument("--sidecar-resources", help="the injected sidecar's resources, as JSON")
    p.add_argument("--stores-secret", help="Secret whose keys become the sidecar's environment (Redis, PostgreSQL)")
    certs = p.add_argument_group("certificates")
    certs.add_argument("--cert-dir", default="/etc/tierwise/webhook-tls", help="folder of tls.crt, tls.key")
    certs.add_argument("--cert-reload-interval", type=float, default=10.0, help="seconds between checks of --cert-dir")
    certs.add_argument(
        "--self-signed", metavar="HOSTS", help="write a CA and a certificate for these names/IPs into --cert-dir first"
    )
    certs.add_argument(
        "--manage-certs",
        action="store_true",
        help="self-managed: keep the certificate in --cert-secret, rotate it, patch the configurations' caBundle",
    )
    certs.add_argument("--cert-secret", help="Secret (in --namespace) shared by the replicas")
    certs.add_argument("--namespace", default=env("POD_NAMESPACE"), help="the webhook's own namespace")
    certs.add_argument("--cert-hosts", help="comma-separated DNS names/IPs the certificate is for")
    certs.add_argument("--cert-validity-hours", type=float, default=8760.0, help="lifetime; renewed after 2/3 of it")
    certs.add_argument("--cert-check-interval", type=float, default=60.0, help="seconds between Secret checks")
    certs.add_argument(
        "--mutating-configuration", action="append", default=[], help="MutatingWebhookConfiguration to patch"
    )
    certs.add_argument(
        "--validating-configuration", action="append", default=[], help="ValidatingWebhookConfiguration to patch"
    )


def operator_main(args: argparse.Namespace) -> int:
    from tierwise_operator import run

    return run.main(args)


def webhook_main(args: argparse.Namespace) -> int:
    from tierwise_operator import webhook

    return webhook.main(args)
