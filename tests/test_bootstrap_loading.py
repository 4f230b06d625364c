"""Bootstrap loading (meshctl.agent.bootstrap): YAML and JSON, and errors that name the field."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from helpers.bootstrap import HTTP_PROTOCOL_OPTIONS_TYPE, cluster, simple_proxy
from helpers.dataplane import envoy_binary

from meshctl.agent.bootstrap import (
    BootstrapError,
    bootstrap_from_dict,
    load_bootstrap_file,
    resource_to_bytes,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "sidecar.yaml"
ROUTE_CONFIGURATION_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def load_error(directory: Path, name: str, text: str) -> str:
    path = write(directory, name, text)
    with pytest.raises(BootstrapError) as caught:
        load_bootstrap_file(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), "every error starts with the file it is about"
    return message


def config_error(config: object) -> str:
    with pytest.raises(BootstrapError) as caught:
        bootstrap_from_dict(config)  # type: ignore[arg-type]
    return str(caught.value)


def test_example_bootstrap_loads():
    bootstrap = Bootstrap.FromString(load_bootstrap_file(EXAMPLE))
    [listener] = bootstrap.static_resources.listeners
    assert listener.address.socket_address.port_value == 15001
    [app] = bootstrap.static_resources.clusters
    endpoint = app.load_assignment.endpoints[0].lb_endpoints[0].endpoint
    assert endpoint.address.socket_address.port_value == 8080
    assert bootstrap.admin.address.socket_address.port_value == 15000


def test_example_bootstrap_is_valid_for_envoy():
    completed = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(EXAMPLE), "-l", "critical"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_yaml_and_json_files_give_the_same_bytes(tmp_path: Path):
    config = simple_proxy(15001, 8080, http2_upstream=True)
    from_yaml = load_bootstrap_file(write(tmp_path, "b.yaml", yaml.safe_dump(config)))
    from_json = load_bootstrap_file(write(tmp_path, "b.json", json.dumps(config)))
    assert from_yaml == from_json == bootstrap_from_dict(config)


@pytest.mark.parametrize("name", ["bootstrap.conf", "bootstrap"])
def test_format_follows_the_content_when_the_name_does_not_tell(tmp_path: Path, name: str):
    config = simple_proxy(15001, 8080)
    expected = bootstrap_from_dict(config)
    assert load_bootstrap_file(write(tmp_path, name, json.dumps(config, indent=2))) == expected
    assert load_bootstrap_file(write(tmp_path, name, yaml.safe_dump(config))) == expected


def test_json_field_names_are_accepted_too():
    snake = {"static_resources": {"clusters": [{"name": "a", "connect_timeout": "2s"}]}}
    camel = {"staticResources": {"clusters": [{"name": "a", "connectTimeout": "2s"}]}}
    assert bootstrap_from_dict(snake) == bootstrap_from_dict(camel)


def test_equal_configs_give_equal_bytes_whatever_the_map_order():
    first, second = cluster("a", 1), cluster("a", 1)
    options = {
        "@type": HTTP_PROTOCOL_OPTIONS_TYPE,
        "explicit_http_config": {"http2_protocol_options": {}},
    }
    first["metadata"] = {"filter_metadata": {"x": {"k": 1}, "y": {"k": 2}}}
    second["metadata"] = {"filter_metadata": {"y": {"k": 2}, "x": {"k": 1}}}
    first["typed_extension_protocol_options"] = {"h": options}
    second["typed_extension_protocol_options"] = {"h": options}
    assert bootstrap_from_dict({"static_resources": {"clusters": [first]}}) == bootstrap_from_dict(
        {"static_resources": {"clusters": [second]}}
    )


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("empty.yaml", "", ["the file is empty"]),
        ("blank.yaml", "  \n\n", ["the file is empty"]),
        ("comments.yaml", "# nothing here\n", ["no YAML content"]),
        ("null.json", "null", ["top level must be a mapping of Bootstrap fields, not null"]),
        (
            "broken.yaml",
            "static_resources:\n  listeners: [\n    - name: x\n",
            ["invalid YAML", "line "],
        ),
        ("tabs.yaml", "admin:\n\taddress: {}\n", ["invalid YAML", "line 2"]),
        ("list.yaml", "- admin: {}\n", ["top level must be a mapping", "a list"]),
        ("scalar.yaml", "hello\n", ["top level must be a mapping", '"hello"']),
        ("two.yaml", "admin: {}\n---\nadmin: {}\n", ["invalid YAML"]),
        ("dup.yaml", "admin: {}\nadmin: {}\n", ['duplicate key "admin"', "first at line 1"]),
        ("broken.json", '{"admin": {}', ["invalid JSON", "line 1, column"]),
        ("dup.json", '{"admin": {}, "admin": {}}', ['duplicate key "admin"']),
        ("list.json", "[]", ["top level must be a mapping"]),
    ],
)
def test_unreadable_documents_are_refused_clearly(
    tmp_path: Path, name: str, text: str, expected: list[str]
):
    message = load_error(tmp_path, name, text)
    for words in expected:
        assert words in message


def test_yaml_merge_keys_may_repeat_keys(tmp_path: Path):
    text = (
        "defaults: &defaults {name: a, connect_timeout: 1s}\n"
        "static_resources:\n  clusters:\n  - <<: *defaults\n    name: b\n"
    )
    # The anchor's holder is not a Bootstrap field: the merge itself must not be the complaint.
    message = load_error(tmp_path, "merge.yaml", text)
    assert 'unknown field "defaults"' in message


def test_missing_file(tmp_path: Path):
    with pytest.raises(BootstrapError, match="nope.yaml: cannot read: No such file or directory"):
        load_bootstrap_file(tmp_path / "nope.yaml")


def test_not_utf8(tmp_path: Path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"admin: {}\n# caf\xe9\n")
    with pytest.raises(BootstrapError, match="not UTF-8"):
        load_bootstrap_file(path)


def _with_listener(**fields: object) -> dict:
    return {"static_resources": {"listeners": [{"name": "l", **fields}]}}


HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _with_hcm(**fields: object) -> dict:
    hcm = {"@type": HCM_TYPE, **fields}
    return _with_listener(filter_chains=[{"filters": [{"name": "hcm", "typed_config": hcm}]}])


HCM_PATH = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            _with_listener(adress={}),
            (
                'static_resources.listeners[0].adress: unknown field "adress" in '
                'envoy.config.listener.v3.Listener (did you mean "address"?)'
            ),
        ),
        (
            _with_listener(address={"socket_address": {"port_value": "eighty"}}),
            'static_resources.listeners[0].address.socket_address.port_value: expected an integer, got "eighty"',
        ),
        (
            _with_listener(address={"socket_address": {"port_value": 2**40}}),
            "port_value: 1099511627776 is out of range for uint32",
        ),
        (
            _with_listener(address={"socket_address": {"address": 127}}),
            "address.socket_address.address: expected a string, got 127",
        ),
        (
            {"static_resources": {"clusters": [{"name": "c"}, {"name": "d", "type": "STATICX"}]}},
            'static_resources.clusters[1].type: "STATICX" is not a DiscoveryType; expected one of STATIC,',
        ),
        (
            {"static_resources": {"clusters": [{"name": "c", "connect_timeout": "1 second"}]}},
            "static_resources.clusters[0].connect_timeout: Duration",
        ),
        (
            {"static_resources": {"clusters": [{"name": "c", "respect_dns_ttl": "maybe"}]}},
            'respect_dns_ttl: expected true or false, got "maybe"',
        ),
        (
            {"static_resources": {"clusters": "c"}},
            'static_resources.clusters: expected a list, got "c"',
        ),
        (
            {"static_resources": {"clusters": [{"name": "c", "load_assignment": "x"}]}},
            "clusters[0].load_assignment: expected a mapping of ClusterLoadAssignment fields",
        ),
        (
            _with_listener(address={"socket_address": {"port_value": 1}, "pipe": {"path": "/p"}}),
            'static_resources.listeners[0].address: set only one of "socket_address", "pipe"',
        ),
        (
            _with_listener(
                filter_chains=[{"filters": [{"name": "f", "typed_config": {"stat_prefix": "x"}}]}]
            ),
            'filters[0].typed_config: missing "@type"',
        ),
        (
            _with_listener(
                filter_chains=[
                    {
                        "filters": [
                            {"name": "f", "typed_config": {"@type": "type.googleapis.com/x.No"}}
                        ]
                    }
                ]
            ),
            'filters[0].typed_config.@type: unknown type "type.googleapis.com/x.No"',
        ),
        (
            _with_hcm(
                route_config={
                    "virtual_hosts": [
                        {
                            "name": "v",
                            "domains": ["*"],
                            "routes": [{"match": {}, "route": {"timeout": 5}}],
                        }
                    ]
                }
            ),
            f"{HCM_PATH}.route_config.virtual_hosts[0].routes[0].route.timeout:",
        ),
        (
            _with_hcm(
                http_filters=[
                    {
                        "name": "r",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                            "suppress_envoy_headerz": True,
                        },
                    }
                ]
            ),
            (
                f"{HCM_PATH}.http_filters[0].typed_config.suppress_envoy_headerz: unknown field"
                ' "suppress_envoy_headerz" in envoy.extensions.filters.http.router.v3.Router'
                ' (did you mean "suppress_envoy_headers"?)'
            ),
        ),
        (
            {"static_resources": {"clusters": [{"name": "c", "metadata": {"filter_metadata": 3}}]}},
            "clusters[0].metadata.filter_metadata: expected a mapping, got 3",
        ),
        (
            {
                "static_resources": {
                    "clusters": [
                        dict(
                            cluster("c", 1),
                            typed_extension_protocol_options={
                                "h": {
                                    "@type": HTTP_PROTOCOL_OPTIONS_TYPE,
                                    "explicit_http_config": {
                                        "http2_protocol_options": {"max_concurrent_streamz": 1}
                                    },
                                }
                            },
                        )
                    ]
                }
            },
            'typed_extension_protocol_options["h"].explicit_http_config.http2_protocol_options.max_concurrent_streamz: unknown field',
        ),
        (
            {"static_resources": {"clusters": [None]}},
            "static_resources.clusters[0]: expected a mapping of Cluster fields, got null",
        ),
        ([], "the top level must be a mapping of Bootstrap fields, not a list"),
    ],
)
def test_field_errors_name_the_path_and_the_reason(config: object, expected: str):
    message = config_error(config)
    assert message.startswith("bootstrap: ")
    assert expected in message


def test_file_errors_name_the_file_and_the_field(tmp_path: Path):
    config = simple_proxy(15001, 8080)
    config["static_resources"]["clusters"][0]["lb_policy"] = "FASTEST"
    message = load_error(tmp_path, "sidecar.yaml", yaml.safe_dump(config))
    assert 'static_resources.clusters[0].lb_policy: "FASTEST" is not a LbPolicy' in message


def test_typed_config_of_any_envoy_extension_parses():
    # Whether meshctl supports an extension is the engine's call; the loader knows every type.
    lua = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": "x"},
    }
    config = _with_hcm(http_filters=[{"name": "envoy.filters.http.lua", "typed_config": lua}])
    assert (
        Bootstrap.FromString(bootstrap_from_dict(config)).static_resources.listeners[0].name == "l"
    )


def test_resource_to_bytes_round_trips():
    route = {
        "name": "r",
        "virtual_hosts": [
            {
                "name": "v",
                "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c"}}],
            }
        ],
    }
    decoded = RouteConfiguration.FromString(resource_to_bytes(ROUTE_CONFIGURATION_TYPE, route))
    assert decoded.virtual_hosts[0].routes[0].route.cluster == "c"


def test_resource_errors_name_the_resource_and_the_field():
    with pytest.raises(BootstrapError) as caught:
        resource_to_bytes(
            ROUTE_CONFIGURATION_TYPE, {"name": "r", "virtual_hosts": [{"name": "v", "domainz": []}]}
        )
    assert str(caught.value).startswith(
        'RouteConfiguration "r": virtual_hosts[0].domainz: unknown field "domainz"'
    )


def test_resource_of_an_unknown_type():
    with pytest.raises(
        BootstrapError, match='unknown xDS resource type "type.googleapis.com/envoy.No"'
    ):
        resource_to_bytes("type.googleapis.com/envoy.No", {})
