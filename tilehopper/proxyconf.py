"""The one proxy template: tinyproxy's configuration and the user-data that installs it.

Used by the operator (stock image + user-data), by ami/ (baked image: the same user-data runs in
the builder) and by the bench (its tinyproxy per moto instance is configured from the instance's
own UserData, read back from EC2). docs/security.md says why tinyproxy.

The configuration carries one placeholder, PRIVATE_IP, which the user-data fills in at boot from
the instance metadata service (IMDSv2) and the bench fills in from describe_instances.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tilehopper.contracts import PROXY_PORT

PRIVATE_IP = "@PRIVATE_IP@"
CONF_MARKER = "TILEHOPPER_PROXY_CONF"
FILTER_MARKER = "TILEHOPPER_PROXY_FILTER"

@dataclass(frozen=True)
class ProxySettings:
    username: str
    password: str
    allowed_cidrs: tuple[str, ...]
    # Destination ports the job's source needs; plain HTTP only to these, CONNECT only to 443.
    http_ports: tuple[int, ...] = (80,)
    connect_ports: tuple[int, ...] = (443,)
    port: int = PROXY_PORT
    max_lifetime_minutes: int = 60
    bind_outgoing: bool = False  # the bench binds outgoing traffic to the instance's address
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for value, what in ((self.username, "username"), (self.password, "password")):
            if not re.fullmatch(r"[A-Za-z0-9._~-]{8,128}", value):
                raise ValueError(f"proxy {what} must be 8-128 URL-safe characters")
        if not self.allowed_cidrs:
            raise ValueError("a proxy needs at least one allowed CIDR: it is never open")

    def __repr__(self) -> str:  # never print the credentials
        return f"ProxySettings(port={self.port}, allowed_cidrs={self.allowed_cidrs}, password=***)"


def ports_for_source(url_template: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(http_ports, connect_ports) the job's tile source needs."""
    parts = urlsplit(url_template.replace("{", "").replace("}", ""))
    if parts.scheme == "https":
        return (80,), (parts.port or 443,)
    return (parts.port or 80,), (443,)


def render_filter(settings: ProxySettings) -> str:
    """URL filter (tinyproxy FilterDefaultDeny): plain HTTP and CONNECT only to the allowed ports."""
    lines = []
    for port in settings.http_ports:
        suffix = f"(:{port})?" if port == 80 else f":{port}"
        lines.append(rf"^http://[^/:@]+{suffix}/")
    # tinyproxy 1.11 runs a CONNECT's "host:port" through the same filter, so without these
    # lines FilterDefaultDeny answers every CONNECT with 403 even on a ConnectPort.
    for port in settings.connect_ports:
        lines.append(rf"^[^/:@]+:{port}$")
    return "\n".join(lines) + "\n"


def render_config(settings: ProxySettings, filter_path: str) -> str:
    lines = [
        f"Port {settings.port}",
        f"Listen {PRIVATE_IP}",
        "Timeout 30",
        "MaxClients 512",
        "LogLevel Warning",  # Warning never logs request lines, so no credentials reach a log
        "DisableViaHeader Yes",
        "XTinyproxy No",
        f"BasicAuth {settings.username} {settings.password}",
        f"Filter \"{filter_path}\"",
        "FilterURLs On",
        "FilterExtended On",
        "FilterDefaultDeny Yes",
    ]
    if settings.bind_outgoing:
        lines.append(f"Bind {PRIVATE_IP}")
    lines += [f"Allow {cidr}" for cidr in settings.allowed_cidrs]
    lines += [f"ConnectPort {port}" for port in settings.connect_ports]
    lines += [f"{k} {v}" for k, v in sorted(settings.extra.items())]
    return "\n".join(lines) + "\n"


CONF_PATH = "/etc/tinyproxy/tinyproxy.conf"
FILTER_PATH = "/etc/tinyproxy/filter"


def _dead_man(minutes: int, why: str) -> str:
    return f'shutdown -h +{minutes} "tilehopper: {why}" || (sleep {minutes * 60} && poweroff) &'


def render_install() -> str:
    """Shell lines that install the proxy and nothing of any job: the job's user-data runs them
    on a stock image, the image builder (ami/) runs them once, so both paths install the same."""
    return """# Amazon Linux's own package; an image baked by ami/ already has it. Whether the stock AL2023
# repositories carry tinyproxy cannot be checked from the bench: docs/security.md says so.
command -v tinyproxy >/dev/null || dnf install -y tinyproxy
id tinyproxy >/dev/null 2>&1 || useradd --system --no-create-home --shell /sbin/nologin tinyproxy
# The package's own unit would serve its stock config on our port: only tilehopper-proxy runs.
systemctl disable --now tinyproxy.service >/dev/null 2>&1 || true
"""


def render_builder_user_data(*, max_lifetime_minutes: int) -> str:
    """The image builder's user-data (ami/ bake): install the proxy, no job's config or
    credentials (each job's own user-data writes those at boot), then power off. The builder's
    shutdown behaviour is stop, and `bake` takes "stopped" as the sign the install succeeded; a
    failed install never gets there. The dead-man halt must come later than bake's deadline."""
    return f"""#!/bin/bash
# tilehopper image builder: a halt stops this instance; bake gave up on it by then.
{_dead_man(max_lifetime_minutes, "image builder lifetime reached")}
set -euo pipefail
{render_install()}dnf clean all || true
# An instance booted from the image is a new instance to cloud-init: it runs that job's user-data.
cloud-init clean --logs || true
poweroff
"""


def render_user_data(settings: ProxySettings) -> str:
    """A cloud-init shell script: dead-man timer first, then install and start the proxy."""
    conf = render_config(settings, FILTER_PATH)
    filt = render_filter(settings)
    minutes = int(settings.max_lifetime_minutes)
    return f"""#!/bin/bash
# tilehopper proxy instance. Shutdown behaviour is terminate, so this halt ends the instance
# after its lifetime even if the operator that launched it is gone.
{_dead_man(minutes, "maxLifetime reached")}
set -euo pipefail
TOKEN=$(curl -sS -X PUT http://169.254.169.254/latest/api/token -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')
PRIVATE_IP=$(curl -sS -H "X-aws-ec2-metadata-token: $TOKEN" http://169.254.169.254/latest/meta-data/local-ipv4)
{render_install()}mkdir -p /etc/tinyproxy
cat > {FILTER_PATH} <<'{FILTER_MARKER}'
{filt}{FILTER_MARKER}
cat > {CONF_PATH} <<'{CONF_MARKER}'
{conf}{CONF_MARKER}
sed -i "s/{PRIVATE_IP}/$PRIVATE_IP/g" {CONF_PATH}
printf 'User tinyproxy\\nGroup tinyproxy\\n' >> {CONF_PATH}
chmod 0640 {CONF_PATH} && chgrp tinyproxy {CONF_PATH}
cat > /etc/systemd/system/tilehopper-proxy.service <<'UNIT'
[Unit]
Description=tilehopper proxy
After=network-online.target
[Service]
ExecStart=/usr/bin/tinyproxy -d -c {CONF_PATH}
Restart=always
[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now tilehopper-proxy.service
"""


def encode_user_data(user_data: str) -> str:
    return base64.b64encode(user_data.encode()).decode()


@dataclass(frozen=True)
class ParsedProxy:
    """What the bench needs to run an instance's proxy: its config and its URL filter."""

    config: str
    filter: str
    port: int


def _between(text: str, marker: str) -> str:
    match = re.search(rf"<<'{marker}'\n(.*?){marker}\n", text, re.S)
    if not match:
        raise ValueError(f"user-data holds no {marker} block: not a tilehopper proxy")
    return match.group(1)


def parse_user_data(user_data: str, private_ip: str, filter_path: str) -> ParsedProxy:
    """Recover the proxy config from UserData, filled in for one instance (the bench's path)."""
    config = _between(user_data, CONF_MARKER).replace(PRIVATE_IP, private_ip)
    config = config.replace(f'Filter "{FILTER_PATH}"', f'Filter "{filter_path}"')
    port = int(re.search(r"^Port (\d+)$", config, re.M).group(1))  # type: ignore[union-attr]
    return ParsedProxy(config=config, filter=_between(user_data, FILTER_MARKER), port=port)

