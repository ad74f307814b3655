#!/usr/bin/env python3
"""Generates docs/openapi.yaml, the OpenAPI 3.0.3 description of the admin REST API.

The object schemas, paths and filters come from the site-model descriptors in common/model.cpp
(every kind, its fields, types, defaults, choices, bounds, state/secret/operational flags), so
the document follows the code: after adding or changing a field, run

    scripts/gen-openapi.py            # rewrites docs/openapi.yaml
    scripts/gen-openapi.py --check    # exit 1 if docs/openapi.yaml is out of date (CI)

To read the descriptors exactly as the daemon sees them, the script compiles common/model.cpp
with a small dumper program (needs a C++20 compiler: $CXX, else c++). Everything that is not in
the descriptors (routes, error replies, paging, the /site, /audit, /info, health and metrics
endpoints) is written out below and must be kept in step with admin/admin_api.cpp by hand; the
version comes from CMakeLists.txt.
Python 3.9+, standard library only.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "docs", "openapi.yaml")

# ------------------------------------------------------------------------------------------------
# Reading the descriptors

DUMPER = r"""
#include "common/model.hpp"

#include <cstdio>
#include <iostream>
#include <string>
#include <string_view>
#include <type_traits>
#include <variant>

using namespace common::model;

namespace {

std::string quote(std::string_view s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

std::string value(const Value& v) {
  return std::visit(
      [](const auto& x) -> std::string {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, std::monostate>) {
          return "null";
        } else if constexpr (std::is_same_v<T, std::string>) {
          return quote(x);
        } else if constexpr (std::is_same_v<T, bool>) {
          return x ? "true" : "false";
        } else if constexpr (std::is_same_v<T, std::int64_t>) {
          return std::to_string(x);
        } else {
          std::string out = "[";
          for (const auto& e : x) out += (out.size() > 1 ? "," : "") + quote(e);
          return out + "]";
        }
      },
      v);
}

const char* type_name(FieldType t) {
  switch (t) {
    case FieldType::text: return "text";
    case FieldType::integer: return "integer";
    case FieldType::boolean: return "boolean";
    case FieldType::text_list: return "text_list";
    case FieldType::timestamp: return "timestamp";
  }
  return "unknown";
}

// FieldSpec::operational is optional here, so the dumper keeps compiling if it goes away.
template <class F>
bool operational(const F& f) {
  if constexpr (requires { f.operational; }) {
    return f.operational;
  } else {
    return false;
  }
}

// FieldSpec::min_items and max_items (text_list element counts), optional in the same way.
template <class F>
std::string item_bounds(const F& f) {
  if constexpr (requires { f.min_items; f.max_items; }) {
    return ",\"min_items\":" + std::to_string(f.min_items) + ",\"max_items\":" + std::to_string(f.max_items);
  } else {
    return ",\"min_items\":0,\"max_items\":0";
  }
}

}  // namespace

int main() {
  std::cout << "[";
  bool first_kind = true;
  for (const auto& k : all_kinds()) {
    std::cout << (first_kind ? "" : ",") << "{\"name\":" << quote(k.name) << ",\"plural\":" << quote(k.plural)
              << ",\"table\":" << quote(k.table) << ",\"api_writable\":" << (k.api_writable ? "true" : "false")
              << ",\"auto_name\":" << (k.auto_name ? "true" : "false") << ",\"fields\":[";
    first_kind = false;
    bool first_field = true;
    for (const auto& f : k.fields) {
      std::cout << (first_field ? "" : ",") << "{\"name\":" << quote(f.name) << ",\"type\":\"" << type_name(f.type)
                << "\",\"required\":" << (f.required ? "true" : "false") << ",\"default\":" << value(f.default_value)
                << ",\"choices\":[";
      first_field = false;
      for (std::size_t i = 0; i < f.choices.size(); ++i) std::cout << (i ? "," : "") << quote(f.choices[i]);
      std::cout << "],\"references\":" << (f.references ? quote(spec(*f.references).name) : std::string("null"))
                << ",\"state\":" << (f.state ? "true" : "false") << ",\"secret\":" << (f.secret ? "true" : "false")
                << ",\"operational\":" << (operational(f) ? "true" : "false") << ",\"min\":" << f.min
                << ",\"max\":" << f.max << item_bounds(f) << ",\"help\":" << quote(f.help) << "}";
    }
    std::cout << "]}";
  }
  std::cout << "]\n";
}
"""


def read_kinds(cxx):
    """Compiles common/model.cpp with the dumper and returns its list of kinds."""
    with tempfile.TemporaryDirectory(prefix="gen-openapi-") as tmp:
        src = os.path.join(tmp, "dump.cpp")
        exe = os.path.join(tmp, "dump")
        with open(src, "w", encoding="utf-8") as f:
            f.write(DUMPER)
        cmd = [cxx, "-std=c++20", "-O0", "-w", "-I", ROOT, src, os.path.join(ROOT, "common", "model.cpp"), "-o", exe]
        built = subprocess.run(cmd, capture_output=True, text=True)
        if built.returncode != 0:
            sys.exit("gen-openapi: cannot compile common/model.cpp with the dumper:\n" + " ".join(cmd) + "\n" +
                     built.stderr)
        ran = subprocess.run([exe], capture_output=True, text=True, check=True)
        return json.loads(ran.stdout)


def find_compiler():
    for c in [os.environ.get("CXX"), "c++", "g++", "clang++"]:
        if c and shutil.which(c):
            return c
    sys.exit("gen-openapi: no C++ compiler found (set CXX)")


# ------------------------------------------------------------------------------------------------
# Words that are not in the descriptors

def project_version():
    """The version in CMakeLists.txt's project() call (what brokerd --version and /info report)."""
    with open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8") as f:
        m = re.search(r"project\(\s*openbroker\s+VERSION\s+([0-9][0-9.]*)", f.read())
    if not m:
        sys.exit("gen-openapi: no project(openbroker VERSION x.y.z) in CMakeLists.txt")
    return m.group(1)


VERSION = project_version()

KIND_DESCRIPTIONS = {
    "site": "The site settings: one object, named `site`. Read and changed with `GET /site` and `PATCH /site`.",
    "hypervisor_connection": "A connection to a hypervisor that powers machines on and off, with the throttles "
                             "of its power-action queue.",
    "catalog": "A collection of machines of one kind: allocation (Static or Random), session support, provisioning.",
    "delivery_group": "Machines delivered to users: desktops, applications or both, Private (assigned) or "
                      "Shared (pooled). A Private group cannot deliver DesktopsAndApps.",
    "power_time_scheme": "Peak hours and pool sizes, per hour, of a delivery group on some days of the week, in the "
                         "group's time_zone (see docs/power.md). The per-hour lists have 24 elements, the first for "
                         "00:00-00:59.",
    "machine": "A desktop or session host. Names are `DOMAIN\\name` (URL-encode the backslash in paths: "
               "`DEMO%5Cpool-01`). Its delivery group's session_support must equal its catalog's. "
               "Registration, power and session fields are maintained by the broker.",
    "application": "A published application, served by the machines of its delivery groups.",
    "rule": "A rule of a delivery group: access (who may connect, from where, with which protocols), entitlement "
            "(a desktop of a Shared group), assignment (a machine of a Private group, assigned on first use) or "
            "app_entitlement (the applications of the group).",
    "assignment": "A machine given to one user or group, or to one client address. Its name is its id, assigned "
                  "at creation. Deleting an assignment is the only way to undo a permanent assignment.",
    "user": "A user of the built-in directory. `password` (write-only) sets the password; it is stored as a "
            "PBKDF2 hash and never returned.",
    "group": "A group of the built-in directory; members are user and group names (groups nest).",
    "session": "A session as the broker knows it, written by the engine (read-only). Its name is the session key.",
    "power_action": "A power action of a machine, as its hypervisor connection's queue has it: Pending, Started, "
                    "or finished (Completed, Failed, Canceled, Lost) within the last hour. Launches, power policy "
                    "and admins create them; admins also cancel and re-prioritise Pending ones (docs/power.md). "
                    "Its name is its id as text.",
}

# Extra sentences for single fields, appended to FieldSpec::help.
FIELD_NOTES = {
    ("machine", "in_maintenance_mode"): "This is how maintenance mode is switched: true sets maintenance_mode_reason "
                                        "to Administrator, false sets it to None.",
    ("machine", "maintenance_mode_reason"): "Administrator when set through in_maintenance_mode.",
    ("machine", "delivery_group"): "Its session_support must equal the catalog's.",
    ("delivery_group", "delivery_type"): "DesktopsAndApps is not allowed for Private groups.",
    ("rule", "rule_type"): "assignment rules need a Private group, entitlement rules a Shared group.",
    ("hypervisor_connection", "driver"): "Cannot be null.",
    ("power_time_scheme", "pool_size"): "Each element is the decimal text of an integer from -1 to 100000 (at most "
                                        "100 when pool_using_percentage is true).",
    ("power_time_scheme", "days_of_week"): "The schemes of one delivery group must not share a day.",
}

ERROR_CODES = ["invalid_argument", "not_found", "conflict", "unauthorized", "forbidden", "unavailable",
               "storage_error", "incompatible", "internal", "method_not_allowed", "payload_too_large",
               "agent_not_connected", "agent_refused", "agent_timeout"]

API_DESCRIPTION = """\
The admin REST API of brokerd, served on the admin listener (`[listeners.admin]`, default
127.0.0.1:8082) under `/api/v1`, plus `/healthz`, `/readyz` and `/metrics` outside it.

This file is generated by `scripts/gen-openapi.py` from the site-model descriptors in
`common/model.cpp`; do not edit it by hand.

## Authentication

Every request needs `Authorization: Bearer <token>`, except `GET /healthz` and the paths listed
in the config file's `[admin] unauthenticated_paths` (for example `/readyz`, `/metrics`). The
config holds only the SHA-256 of each token (`[[admin.token]]`, made with `brokerd --hash-token`).
A missing or wrong token gets 401 with `WWW-Authenticate: Bearer`. Changes are recorded in the
audit log as made by `token:<name>`.

## Errors

Every error reply has the body `{"error": {"code", "message", "fields"?}}`; `fields` (present on
400 validation errors) names the offending member(s).

| status | code | when |
|---|---|---|
| 400 | invalid_argument | malformed JSON, wrong types, unknown fields, bad enum values, out-of-range numbers, missing required fields, unknown references, unknown query parameters or filter fields |
| 401 | unauthorized | missing or wrong bearer token |
| 403 | forbidden | authenticated but not allowed (not used by this version) |
| 404 | not_found | unknown object or route |
| 405 | method_not_allowed | wrong method; the `Allow` header lists the right ones |
| 409 | conflict | duplicate name; deleting an object that is still referenced (e.g. a delivery group that still has machines); changing or deleting an object declared in the config file; a session action on a session that has logged off; a power action for a machine that is not power-managed; canceling or re-prioritising a power action that is not Pending |
| 409 | agent_not_connected, agent_refused | session actions: the machine's agent is not connected (or disconnected before it answered), or it refused the command (its error is in the message) |
| 413 | payload_too_large | body larger than `[listeners.admin] body_limit_bytes` (default 1 MiB) |
| 500 | internal, storage_error, incompatible | a bug, or the database failed |
| 503 | unavailable | storage unavailable, or the broker is shutting down; session or power actions on a broker built without the launcher or power management |
| 504 | agent_timeout | session actions: the machine's agent did not answer in time (5 s) |

## Objects

Each writable kind has a collection `/{plural}` (GET list, POST create) and items
`/{plural}/{name}` (GET, PATCH merge, PUT replace, DELETE). Sessions are read-only (GET only;
other methods get 405); they are acted on with `POST /sessions/{name}/logoff`, `/disconnect`
and `/message`, which the broker sends to the session's agent. Power actions have their own
routes: `POST /power-actions` queues one per machine, `PATCH /power-actions/{id}` changes a
Pending one's priority, `POST /power-actions/{id}/cancel` cancels it. The site settings are
`/site` (GET, PATCH).

* Every object has `id`, `name`, `owner` (`api`, or `config:<path>` for objects declared in
  the config file), `config_owned`, `created_at` and `updated_at` (RFC 3339 UTC with
  milliseconds, e.g. `2026-11-23T10:42:55.123Z`), and its kind's fields. Secret fields
  (@SECRETS@) are never shown.
* Names are unique per kind, at most 256 characters, without control characters and without
  `/ ? # %`. In paths they are URL-encoded: the machine `DEMO\\pool-01` is
  `/machines/DEMO%5Cpool-01`.
* POST: the body is the object; `name` is required (except for assignments, whose name is their
  id); fields not given take their defaults. 201 with the stored object and a `Location` header.
* PATCH merges the given fields and leaves the others unchanged; `name` may be given to rename
  (references to the object follow). PUT replaces: fields not given return to their defaults.
* `id`, `owner`, `config_owned`, `created_at` and `updated_at` are ignored when sent. State
  fields (read-only, maintained by the broker) and secret fields are rejected with 400.
* Fields whose default is null may be set to null to clear them.
* Objects declared in the config file can only be changed there: PATCH, PUT and DELETE on them
  get 409 with a message like "machine 'X' is declared in /etc/openbroker/brokerd.toml; change it
  there". Operational switches are the exception: they may be changed through the API on any
  object (@OPERATIONAL@).

## Lists

`GET /{plural}` takes `limit` (default 100, 0 to 1000), `offset` (default 0), and equality
filters: `name`, `owner` or any non-secret field of the kind, e.g.
`?registration_state=Registered&in_maintenance_mode=false`. Booleans are `true`/`false`; a list
field (e.g. `tags`) matches when the list contains the value. Several filters must all match.
An unknown filter field is a 400. The reply is `{"items": [...], "total": <matching count>,
"offset": n, "limit": n}`, ordered by id.
"""


# ------------------------------------------------------------------------------------------------
# Building the document

def pascal(name):
    return "".join(part.capitalize() for part in name.split("_"))


def label(kind_name):
    return kind_name.replace("_", " ")


def ref(kind, name):
    return {"$ref": "#/components/%s/%s" % (kind, name)}


def sentence(text):
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def nullable_field(f):
    return f["default"] is None and not f["required"]


def field_schema(kind, f, for_output):
    s = {}
    t = f["type"]
    if t == "text":
        s["type"] = "string"
        if f["choices"]:
            s["enum"] = list(f["choices"])
    elif t == "timestamp":
        s["type"] = "string"
        s["format"] = "date-time"
    elif t == "integer":
        s["type"] = "integer"
        s["format"] = "int64"
        if f["min"] < f["max"]:
            s["minimum"] = f["min"]
            s["maximum"] = f["max"]
    elif t == "boolean":
        s["type"] = "boolean"
    elif t == "text_list":
        s["type"] = "array"
        s["items"] = {"type": "string", "minLength": 1}
        if f["choices"]:
            s["items"]["enum"] = list(f["choices"])
        if f["min"] < f["max"]:
            s["items"]["pattern"] = "^-?[0-9]+$"
        if f.get("max_items"):
            s["minItems"] = f["min_items"]
            s["maxItems"] = f["max_items"]
    else:
        raise SystemExit("gen-openapi: unknown field type %r of %s.%s" % (t, kind["name"], f["name"]))
    if nullable_field(f):
        s["nullable"] = True
    if f["default"] is not None:
        s["default"] = f["default"]
    if f["state"] and for_output:
        s["readOnly"] = True
    words = [sentence(f["help"])]
    if f["references"]:
        words.append("Names a %s." % label(f["references"]) if t != "text_list"
                     else "Each element names a %s." % label(f["references"]))
    note = FIELD_NOTES.get((kind["name"], f["name"]))
    if note:
        words.append(note)
    if f["state"]:
        words.append("Read-only: maintained by the broker.")
    if f.get("operational"):
        words.append("Operational switch: may be changed through the API even on objects declared in the config "
                     "file.")
    s["description"] = " ".join(w for w in words if w)
    if f["references"]:
        s["x-references"] = f["references"]
    return s


def common_properties(kind):
    props = {
        "id": {"type": "integer", "format": "int64", "readOnly": True, "description": "Assigned by the broker."},
        "name": {"type": "string", "minLength": 1, "maxLength": 256,
                 "description": "Unique name of the %s." % label(kind["name"])},
        "owner": {"type": "string", "readOnly": True, "pattern": "^(api|config:.+)$",
                  "description": "`api`, or `config:<path>` for objects declared in that config file.",
                  "example": "api"},
        "config_owned": {"type": "boolean", "readOnly": True,
                         "description": "True when the config file declares the object (then it is changed there)."},
        "created_at": {"type": "string", "format": "date-time", "readOnly": True,
                       "description": "RFC 3339 UTC with milliseconds.", "example": "2026-11-23T10:42:55.123Z"},
        "updated_at": {"type": "string", "format": "date-time", "readOnly": True,
                       "description": "RFC 3339 UTC with milliseconds.", "example": "2026-11-23T10:42:55.123Z"},
    }
    if kind["auto_name"]:
        props["name"] = {"type": "string", "readOnly": True,
                         "description": "The %s's id as text, assigned at creation." % label(kind["name"])}
    if kind["name"] == "site":
        props["name"] = {"type": "string", "readOnly": True, "enum": ["site"], "description": "Always `site`."}
    if kind["name"] == "machine":
        props["name"]["example"] = "DEMO\\pool-01"
    return props


def visible_fields(kind):
    return [f for f in kind["fields"] if not f["secret"]]


def writable_fields(kind):
    return [f for f in kind["fields"] if not f["secret"] and not f["state"]]


def hidden_note(kind):
    secret = [f["name"] for f in kind["fields"] if f["secret"]]
    if not secret:
        return ""
    return " Not shown (secret): %s." % ", ".join(secret)


def output_schema(kind):
    props = common_properties(kind)
    for f in visible_fields(kind):
        props[f["name"]] = field_schema(kind, f, True)
    return {
        "type": "object",
        "description": KIND_DESCRIPTIONS.get(kind["name"], label(kind["name"])) + hidden_note(kind),
        "required": list(props.keys()),
        "properties": props,
    }


def input_schema(kind, mode):
    """mode: create (POST), replace (PUT), patch (PATCH)."""
    props = {}
    required = []
    if not kind["auto_name"] and kind["name"] != "site":
        props["name"] = {"type": "string", "minLength": 1, "maxLength": 256,
                         "description": {
                             "create": "Unique name; at most 256 characters, no control characters and none of "
                                       "/ ? # %.",
                             "replace": "Renames the object when it differs from the name in the path.",
                             "patch": "Renames the object; references to it follow.",
                         }[mode]}
        if kind["name"] == "machine":
            props["name"]["example"] = "DEMO\\pool-01"
        if mode == "create":
            required.append("name")
    for f in writable_fields(kind):
        props[f["name"]] = field_schema(kind, f, False)
        if mode == "patch":
            # Not given means unchanged here, so a default would mislead.
            props[f["name"]].pop("default", None)
        # Required fields without a default must be given on create and on replace.
        if f["required"] and f["default"] is None and mode != "patch":
            required.append(f["name"])
    if kind["name"] == "user":
        props["password"] = {"type": "string", "format": "password", "minLength": 8, "writeOnly": True,
                             "description": "Sets the password (stored as a PBKDF2 hash, never returned)."}
    what = {
        "create": "Body of POST: the new %s. Fields not given take their defaults." % label(kind["name"]),
        "replace": "Body of PUT: the whole %s. Fields not given return to their defaults; state fields are kept."
                   % label(kind["name"]),
        "patch": "Body of PATCH: the fields to change; the others stay as they are.",
    }[mode]
    if kind["name"] == "assignment" and mode != "patch":
        what += " Exactly one of user and client_ip."
    s = {"type": "object",
         "description": what + " Unknown members, state fields and secret fields are a 400; id, owner, config_owned, "
                        "created_at and updated_at are ignored.",
         "additionalProperties": False, "properties": props}
    if required:
        s["required"] = required
    return s


def list_schema(kind):
    return {
        "type": "object",
        "required": ["items", "total", "offset", "limit"],
        "properties": {
            "items": {"type": "array", "items": ref("schemas", pascal(kind["name"]))},
            "total": {"type": "integer", "format": "int64", "description": "Objects matching the filters."},
            "offset": {"type": "integer", "format": "int64"},
            "limit": {"type": "integer", "format": "int64"},
        },
    }


def filter_parameters(kind):
    params = [ref("parameters", "limit"), ref("parameters", "offset"),
              {"name": "name", "in": "query", "required": False, "schema": {"type": "string"},
               "description": "Only the object with this name."},
              {"name": "owner", "in": "query", "required": False, "schema": {"type": "string"},
               "description": "Only objects with this owner: `api` or `config:<path>`."}]
    for f in visible_fields(kind):
        t = f["type"]
        if t == "boolean":
            schema = {"type": "boolean"}
        elif t == "integer":
            schema = {"type": "integer", "format": "int64"}
        elif t == "text" and f["choices"]:
            schema = {"type": "string", "enum": list(f["choices"])}
        else:
            schema = {"type": "string"}
        what = ("Only objects whose %s contains this value." if t == "text_list"
                else "Only objects whose %s equals this value.") % f["name"]
        params.append({"name": f["name"], "in": "query", "required": False, "schema": schema, "description": what})
    return params


def responses(*codes, ok=None):
    out = {}
    if ok:
        out.update(ok)
    names = {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 409: "Conflict", 413: "PayloadTooLarge",
             500: "InternalError", 503: "Unavailable"}
    for c in codes:
        out[str(c)] = ref("responses", names[c])
    return out


def json_content(schema, example=None):
    c = {"schema": schema}
    if example is not None:
        c["example"] = example
    return {"application/json": c}


def referrers(kinds, target):
    """Which fields of other kinds name objects of `target`: ["a machine (catalog)", ...]."""
    out = []
    for k in kinds:
        for f in k["fields"]:
            if f["references"] == target:
                article = "an" if k["name"][0] in "aeiou" else "a"
                out.append("%s %s (%s)" % (article, label(k["name"]), f["name"]))
    return out


def kind_paths(kinds, kind):
    sname = pascal(kind["name"])
    plural = kind["plural"]
    tag = plural
    name_param = ref("parameters", "name")
    if kind["name"] == "machine":
        name_param = ref("parameters", "machineName")
    elif kind["name"] == "session":
        name_param = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                      "description": "The session key."}
    elif kind["name"] == "power_action":
        name_param = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                      "description": "The power action's uid."}
    elif kind["auto_name"]:
        name_param = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                      "description": "The %s's name (its id)." % label(kind["name"])}
    one = ref("schemas", sname)
    collection = {
        "get": {
            "tags": [tag],
            "operationId": "list%ss" % sname,
            "summary": "List %ss" % label(kind["name"]),
            "description": "Pages through the %ss, ordered by id, with optional equality filters."
                           % label(kind["name"]),
            "parameters": filter_parameters(kind),
            "responses": responses(400, 401, 500, 503, ok={
                "200": {"description": "A page of %ss." % label(kind["name"]),
                        "content": json_content(ref("schemas", sname + "List"))}}),
        },
    }
    item = {
        "parameters": [name_param],
        "get": {
            "tags": [tag],
            "operationId": "get%s" % sname,
            "summary": "Get a %s" % label(kind["name"]),
            "responses": responses(401, 404, 500, 503, ok={
                "200": {"description": "The %s." % label(kind["name"]), "content": json_content(one)}}),
        },
    }
    if not kind["api_writable"]:
        collection["description"] = "Read-only: other methods get 405 with `Allow: GET`."
        item["description"] = "Read-only: other methods get 405 with `Allow: GET`."
        return {"/" + plural: collection, "/" + plural + "/{name}": item}

    location = {"Location": {"description": "Path of the new object, e.g. `/api/v1/%s/<url-encoded name>`." % plural,
                             "schema": {"type": "string"}}}
    collection["post"] = {
        "tags": [tag],
        "operationId": "create%s" % sname,
        "summary": "Create a %s" % label(kind["name"]),
        "requestBody": {"required": True, "content": json_content(ref("schemas", sname + "Create"))},
        "responses": responses(400, 401, 409, 413, 500, 503, ok={
            "201": {"description": "Created; the stored object, with its defaults filled in.", "headers": location,
                    "content": json_content(one)}}),
    }
    item["patch"] = {
        "tags": [tag],
        "operationId": "update%s" % sname,
        "summary": "Change some fields of a %s" % label(kind["name"]),
        "description": "Merges the given fields; the others are unchanged." +
                       ("" if kind["auto_name"] else " Give `name` to rename."),
        "requestBody": {"required": True, "content": json_content(ref("schemas", sname + "Patch"))},
        "responses": responses(400, 401, 404, 409, 413, 500, 503, ok={
            "200": {"description": "The updated %s." % label(kind["name"]), "content": json_content(one)}}),
    }
    item["put"] = {
        "tags": [tag],
        "operationId": "replace%s" % sname,
        "summary": "Replace a %s" % label(kind["name"]),
        "description": "Fields not given return to their defaults (state and secret fields are kept).",
        "requestBody": {"required": True, "content": json_content(ref("schemas", sname + "Replace"))},
        "responses": responses(400, 401, 404, 409, 413, 500, 503, ok={
            "200": {"description": "The replaced %s." % label(kind["name"]), "content": json_content(one)}}),
    }
    users = referrers(kinds, kind["name"])
    delete_desc = ""
    if users:
        listed = users[0] if len(users) == 1 else ", ".join(users[:-1]) + " or " + users[-1]
        delete_desc = "409 while it is still referenced by %s." % listed
    if kind["name"] == "assignment":
        delete_desc = "Deleting an assignment is the only way to undo a permanent assignment."
    item["delete"] = {
        "tags": [tag],
        "operationId": "delete%s" % sname,
        "summary": "Delete a %s" % label(kind["name"]),
        "description": (delete_desc + " " if delete_desc else "") +
                       "Objects declared in the config file cannot be deleted here (409).",
        "responses": responses(401, 404, 409, 500, 503, ok={"204": {"description": "Deleted."}}),
    }
    return {"/" + plural: collection, "/" + plural + "/{name}": item}


AUDIT_ACTIONS = """\
What happened (the list may grow). Changes: `create`, `update`, `delete` (API or config file), `rotate-secret`
(machine). Launches (actor `broker`, kind `session`; `after` holds the details, e.g.
`{"user", "reason", "message", ...}` with `reason` a launch failure such as
`AllMachinesUnregistered` or `SessionPrepareFailure`): `launch`, `launch-refused` (no machine
could be given; object: the resource), `launch-failed` (the agent could not prepare the
session), `launch-timeout` (the client never came). Session actions (actor: the admin token,
kind `session`; `after`: `{"machine", "result": "done"|"failed", "error"?, "title"?, "text"?}`):
`session-logoff`, `session-disconnect`, `session-message`. Power actions (actor: the admin token, kind
`power_action`, object: the action's id; `before`/`after`: the action): `power-action-create` (one entry per
action returned), `power-action-cancel`, `power-action-priority`."""


def session_action_paths():
    """POST /sessions/{name}/logoff|disconnect|message (admin/admin_api.cpp session_action)."""
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
            "example": "S0D8AF35A28AFD05522C8",
            "description": "The session key, URL-encoded (sessions the broker did not broker keep the agent's key)."}
    done = {"type": "object", "required": ["session", "command", "result"], "properties": {
        "session": {"type": "string"}, "command": {"type": "string", "enum": ["logoff", "disconnect", "message"]},
        "result": {"type": "string", "enum": ["done"]}}}
    what = {
        "logoff": ("logoffSession", "Log a session off",
                   "The agent logs the session off; the broker then records it as ended (it leaves the live "
                   "sessions). No body (or `{}`)."),
        "disconnect": ("disconnectSession", "Disconnect a session",
                       "The agent disconnects the client and keeps the session (state Disconnected). No body "
                       "(or `{}`)."),
        "message": ("messageSession", "Show a message in a session",
                    "The agent shows the message to the session's user; `ok` once it is displayed."),
    }
    paths = {}
    for command, (op, summary, text) in what.items():
        post = {
            "tags": ["sessions"], "operationId": op, "summary": summary,
            "description": text + " The broker sends the command to the agent of the session's machine and "
                           "answers once the agent has (at most 20 s). Each attempt that reaches the agent is "
                           "audited as `session-" + command + "` (kind session, actor the admin token) with "
                           "its result. Other methods get 405 with `Allow: POST`; without a brokering engine "
                           "503. `brokerctl session " + command + " NAME" +
                           (" --text TEXT [--title TITLE]" if command == "message" else "") + "`.",
            "parameters": [name],
        }
        if command == "message":
            post["requestBody"] = {"required": True, "content": json_content({
                "type": "object", "required": ["text"], "additionalProperties": False, "properties": {
                    "title": {"type": "string", "nullable": True, "maxLength": 256,
                              "description": "Optional; at most 256 bytes, no control characters."},
                    "text": {"type": "string", "minLength": 1, "maxLength": 4096,
                             "description": "1 to 4096 bytes; no control characters but tab and line breaks."}}},
                {"title": "Maintenance", "text": "The desktop restarts at 18:00. Please save your work."})}
        post["responses"] = responses(400, 401, 404, 500, 503, ok={"200": {
            "description": "The agent has done it.",
            "content": json_content(done, {"session": "S0D8AF35A28AFD05522C8", "command": command,
                                           "result": "done"})}})
        post["responses"]["409"] = error_response(
            "agent_not_connected: the machine's agent is not connected (or disconnected before it answered); "
            "agent_refused: the agent refused (its error is in the message); conflict: the session has "
            "already logged off.", "agent_not_connected",
            "the agent of machine 'DEMO\\pool-01' is not connected")
        post["responses"]["504"] = error_response(
            "agent_timeout: the agent did not answer in time.", "agent_timeout",
            "the agent of machine 'DEMO\\pool-01' did not answer in time")
        post["responses"] = dict(sorted(post["responses"].items()))
        paths["/sessions/{name}/" + command] = {"post": post}
    return paths

POWER_ACTION_STATES = ["Pending", "Started", "Completed", "Failed", "Canceled", "Lost"]
POWER_ACTIONS = ["TurnOn", "TurnOff", "Shutdown", "Reset", "Restart", "Suspend", "Resume"]


def power_action_schema(kind):
    """The power action as the admin API shows it (admin/admin_api.cpp action_json): the manager's
    record, not the stored object (no owner, config_owned, created_at, updated_at; plus attempts)."""
    props = {
        "id": {"type": "integer", "format": "int64", "readOnly": True,
               "description": "Assigned by the broker, unique in the site."},
        "name": {"type": "string", "readOnly": True, "description": "The id as text."},
    }
    for f in visible_fields(kind):
        s = field_schema(kind, f, True)
        s.pop("default", None)
        props[f["name"]] = s
    props["state"]["enum"] = POWER_ACTION_STATES
    props["state"]["description"] = ("Pending (queued, or waiting for a retry), Started (sent to the hypervisor, "
                                     "followed until the machine reaches the action's target state), Completed, "
                                     "Failed, Canceled, Lost. Read-only: maintained by the broker.")
    props["hypervisor_connection"].pop("nullable", None)
    props["hypervisor_connection"]["x-references"] = "hypervisor_connection"
    props["hypervisor_connection"]["description"] = "The connection whose queue runs it. Names a hypervisor connection."
    props["actual_priority"]["description"] = ("The priority the queue orders by (lower first): the base priority, "
                                               "unless boosted by a more urgent request or changed by an admin.")
    for t, what in [("request_time", "When it was queued."),
                    ("start_time", "When it was sent to the hypervisor (the latest attempt); null before."),
                    ("completion_time", "When it finished; null before.")]:
        props[t]["description"] = what + " RFC 3339 UTC with milliseconds."
    props["failure_reason"]["description"] = ("Why it failed; while a retry waits (Pending), the failure being "
                                              "retried; null otherwise.")
    props["attempts"] = {"type": "integer", "minimum": 0, "readOnly": True,
                         "description": "Times it was sent to the hypervisor (retries included)."}
    return {
        "type": "object",
        "description": KIND_DESCRIPTIONS["power_action"],
        "required": list(props.keys()),
        "properties": props,
        "example": {"id": 12, "name": "12", "machine": "DEMO\\pool-01", "hypervisor_connection": "lab",
                    "action": "TurnOn", "state": "Started", "base_priority": 30, "actual_priority": 30,
                    "reason": "Admin", "request_time": "2026-11-23T10:42:55.123Z",
                    "start_time": "2026-11-23T10:42:55.200Z", "completion_time": None, "failure_reason": None,
                    "attempts": 1},
    }


def power_action_paths():
    """/power-actions, /power-actions/{id}, /power-actions/{id}/cancel (admin/admin_api.cpp power_actions)."""
    tag = "power-actions"
    one = ref("schemas", "PowerAction")
    id_param = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "format": "int64"},
                "example": 12, "description": "The power action's id."}
    not_found = error_response("not_found: no power action with that id.", "not_found",
                               "no power action with id '12'")
    def not_pending(what):
        return error_response("conflict: the action is not Pending (it has started or finished).", "conflict",
                              "power action 12 is Started; only Pending actions can be " + what)
    unavailable = error_response(
        "unavailable: the broker has no power management (then only GET works, on the stored actions), or it is "
        "shutting down.", "unavailable", "power actions cannot be changed: this broker has no power manager")

    def with_codes(base, **extra):
        out = dict(base)
        out.update(extra)
        return dict(sorted(out.items()))

    list_params = [
        {"name": "machine", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "Only the actions of this machine."},
        {"name": "state", "in": "query", "required": False, "schema": {"type": "string"},
         "example": "Pending,Started",
         "description": "Only actions in one of these states (comma-separated): " + ", ".join(POWER_ACTION_STATES) +
                        ". Another value is a 400."},
        {"name": "action", "in": "query", "required": False, "schema": {"type": "string"}, "example": "TurnOn",
         "description": "Only these actions (comma-separated): " + ", ".join(POWER_ACTIONS) + "."},
        {"name": "hypervisor_connection", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "Only the actions of this connection's queue."},
        {"name": "reason", "in": "query", "required": False, "schema": {"type": "string"}, "example": "Admin",
         "description": "Only actions of this origin (Launch, Admin, Policy, IdlePool, ...)."},
        ref("parameters", "limit"), ref("parameters", "offset"),
    ]
    create_body = {
        "type": "object", "required": ["machines", "action"], "additionalProperties": False,
        "properties": {
            "machines": {"type": "array", "minItems": 1, "maxItems": 1000,
                         "items": {"type": "string", "minLength": 1, "x-references": "machine"},
                         "description": "The machines (names; duplicates count once)."},
            "action": {"type": "string", "enum": POWER_ACTIONS,
                       "description": "TurnOff is a hard power-off, Shutdown a guest shutdown; Reset a hard reset, "
                                      "Restart a guest reboot."},
            "priority": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 30,
                         "description": "Base priority; lower runs first (launches are 10, schedules 40, "
                                        "policy 50)."},
        },
    }
    created = {"type": "object", "required": ["items"], "properties": {
        "items": {"type": "array", "items": one,
                  "description": "One action per machine, in the order given. A machine that already had the "
                                 "same action Pending (or Started, except Reset and Restart) gets that action "
                                 "back, its priority lowered to this request's when that is more urgent."}}}
    patch_body = {"type": "object", "required": ["priority"], "additionalProperties": False, "properties": {
        "priority": {"type": "integer", "minimum": 0, "maximum": 1000,
                     "description": "The new actual priority (the base priority is kept)."}}}
    collection = {
        "get": {
            "tags": [tag], "operationId": "listPowerActions", "summary": "List power actions",
            "description": "The actions of every connection's queue, by id: Pending, Started, and those finished "
                           "within the last hour. Other query parameters are a 400. Without power management "
                           "(not the case in brokerd) the stored actions are listed, with the filters of the "
                           "other lists. `brokerctl power list [--machine M] [--state S]`.",
            "parameters": list_params,
            "responses": responses(400, 401, 500, 503, ok={"200": {
                "description": "A page of power actions.", "content": json_content(ref("schemas", "PowerActionList"))}}),
        },
        "post": {
            "tags": [tag], "operationId": "createPowerActions", "summary": "Queue a power action for machines",
            "description": "Queues the action for each machine with reason Admin; nothing is queued when one "
                           "machine is unknown (404) or not power-managed (409: its catalog names no hypervisor "
                           "connection, or that connection's driver could not be started). Audited as "
                           "`power-action-create`, one entry per action. Other methods get 405 with "
                           "`Allow: GET, POST`. `brokerctl power create ACTION MACHINE... [--priority N]`.",
            "requestBody": {"required": True, "content": json_content(create_body, {
                "machines": ["DEMO\\pool-01", "DEMO\\pool-02"], "action": "Shutdown"})},
            "responses": with_codes(responses(400, 401, 413, 500, ok={"201": {
                "description": "Queued.", "content": json_content(created)}}),
                **{"404": error_response("not_found: a machine does not exist.", "not_found",
                                         "machines: no machine named 'DEMO\\pool-99'"),
                   "409": error_response("conflict: a machine is not power-managed.", "conflict",
                                         "machines: machine 'DEMO\\rds-01' is not power-managed (its catalog has "
                                         "no hypervisor_connection)"),
                   "503": unavailable}),
        },
    }
    item = {
        "parameters": [id_param],
        "get": {
            "tags": [tag], "operationId": "getPowerAction", "summary": "Get a power action",
            "responses": with_codes(responses(401, 500, 503, ok={"200": {
                "description": "The power action.", "content": json_content(one)}}), **{"404": not_found}),
        },
        "patch": {
            "tags": [tag], "operationId": "setPowerActionPriority", "summary": "Change a Pending action's priority",
            "description": "Sets the actual priority (0 to 1000, lower runs first); only `priority` may be given. "
                           "Audited as `power-action-priority`. Other methods get 405 with `Allow: GET, PATCH`. "
                           "`brokerctl power priority ID N`.",
            "requestBody": {"required": True, "content": json_content(patch_body, {"priority": 5})},
            "responses": with_codes(responses(400, 401, 413, 500, ok={"200": {
                "description": "The action with its new priority.", "content": json_content(one)}}),
                **{"404": not_found, "409": not_pending("re-prioritised"), "503": unavailable}),
        },
    }
    cancel = {"post": {
        "tags": [tag], "operationId": "cancelPowerAction", "summary": "Cancel a Pending power action",
        "description": "Pending becomes Canceled; a Started action cannot be canceled (409). The body, if any, is ignored. "
                       "Audited as `power-action-cancel`. Other methods get 405 with `Allow: POST`. "
                       "`brokerctl power cancel ID`.",
        "parameters": [id_param],
        "responses": with_codes(responses(401, 500, ok={"200": {
            "description": "The canceled action.", "content": json_content(one)}}),
            **{"404": not_found, "409": not_pending("canceled"), "503": unavailable}),
    }}
    return {"/power-actions": collection, "/power-actions/{id}": item, "/power-actions/{id}/cancel": cancel}


def error_schema():
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "enum": ERROR_CODES},
                    "message": {"type": "string", "description": "Human-readable; safe to show."},
                    "fields": {
                        "type": "array",
                        "description": "On 400 validation errors: the members at fault.",
                        "items": {
                            "type": "object",
                            "required": ["field", "message"],
                            "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                        },
                    },
                },
            },
        },
    }


def error_response(description, code, message, headers=None, fields=None):
    err = {"code": code, "message": message}
    if fields:
        err["fields"] = fields
    r = {"description": description, "content": json_content(ref("schemas", "Error"), {"error": err})}
    if headers:
        r["headers"] = headers
    return r


def components_responses():
    return {
        "BadRequest": error_response(
            "invalid_argument: malformed JSON, wrong types, unknown fields, bad enum values, out-of-range numbers, "
            "missing required fields, unknown references, unknown query parameters or filter fields.",
            "invalid_argument", "catalog: no catalog named 'x'",
            fields=[{"field": "catalog", "message": "no catalog named 'x'"}]),
        "Unauthorized": error_response(
            "unauthorized: missing or wrong bearer token.", "unauthorized",
            "an Authorization: Bearer <token> header is required",
            headers={"WWW-Authenticate": {"schema": {"type": "string"}, "example": "Bearer"}}),
        "NotFound": error_response("not_found: no such object or route.", "not_found", "no machine named 'x'"),
        "MethodNotAllowed": error_response(
            "method_not_allowed: the route exists but not with this method.", "method_not_allowed",
            "method not allowed; use GET",
            headers={"Allow": {"schema": {"type": "string"}, "example": "GET"}}),
        "Conflict": error_response(
            "conflict: duplicate name; the object is still referenced; or the object is declared in the config file "
            "and can only be changed there.", "conflict",
            "machine 'DEMO\\pool-01' is declared in /etc/openbroker/brokerd.toml; change it there"),
        "PayloadTooLarge": error_response(
            "payload_too_large: the body is larger than the admin listener's body_limit_bytes.",
            "payload_too_large", "request body too large"),
        "InternalError": error_response(
            "internal (a bug), storage_error (the database failed) or incompatible.", "storage_error",
            "database /var/lib/openbroker/brokerd.db: disk full"),
        "Unavailable": error_response(
            "unavailable: storage is unavailable or the broker is shutting down.", "unavailable",
            "the broker is shutting down"),
    }


def api_description(kinds):
    secrets = ["%s.%s" % (k["name"], f["name"]) for k in kinds for f in k["fields"] if f["secret"]]
    switches = ["%s.%s" % (k["name"], f["name"]) for k in kinds for f in k["fields"] if f.get("operational")]
    return (API_DESCRIPTION.replace("@SECRETS@", ", ".join(secrets) or "none")
            .replace("@OPERATIONAL@", ", ".join(switches) or "none"))


def build(kinds):
    by_name = {k["name"]: k for k in kinds}
    kind_names = [k["name"] for k in kinds]

    schemas = {"Error": error_schema()}
    for k in kinds:
        sname = pascal(k["name"])
        schemas[sname] = output_schema(k)
        if k["name"] == "site":
            schemas["SitePatch"] = input_schema(k, "patch")
            continue
        schemas[sname + "List"] = list_schema(k)
        if k["api_writable"]:
            schemas[sname + "Create"] = input_schema(k, "create")
            schemas[sname + "Replace"] = input_schema(k, "replace")
            schemas[sname + "Patch"] = input_schema(k, "patch")
    schemas["PowerAction"] = power_action_schema(by_name["power_action"])
    schemas["Machine"]["properties"]["pending_power_actions"] = {
        "type": "array", "readOnly": True,
        "description": "Only in `GET /machines/{name}`, and only with power management: the machine's Pending "
                       "and Started power actions.",
        "items": {"type": "object", "required": ["id", "action", "state", "actual_priority"], "properties": {
            "id": {"type": "integer", "format": "int64"},
            "action": {"type": "string", "enum": POWER_ACTIONS},
            "state": {"type": "string", "enum": ["Pending", "Started"]},
            "actual_priority": {"type": "integer"}}},
    }
    schemas["AuditEntry"] = {
        "type": "object",
        "required": ["id", "time", "actor", "action", "kind", "object", "before", "after"],
        "properties": {
            "id": {"type": "integer", "format": "int64"},
            "time": {"type": "string", "format": "date-time", "example": "2026-11-23T10:42:55.123Z"},
            "actor": {"type": "string", "description": "`token:<name>` (admin API), `config:<path>` (config file) "
                                                      "or `broker` (the engine).",
                      "example": "token:ops"},
            "action": {"type": "string", "example": "update", "description": AUDIT_ACTIONS},
            "kind": {"type": "string", "enum": kind_names,
                     "description": "The kind's name (singular, with underscores)."},
            "object": {"type": "string", "description": "The object's name (launch-refused: the resource asked for)."},
            "before": {"type": "object", "nullable": True, "additionalProperties": True,
                       "description": "The object before the change (secrets omitted); null on create and for "
                                      "events."},
            "after": {"type": "object", "nullable": True, "additionalProperties": True,
                      "description": "The object after the change (secrets omitted); null on delete. For events "
                                     "(launches, session actions), what happened: see `action`."},
        },
    }
    schemas["AuditPage"] = {
        "type": "object",
        "required": ["items", "offset", "limit"],
        "properties": {
            "items": {"type": "array", "items": ref("schemas", "AuditEntry"), "description": "Newest first."},
            "offset": {"type": "integer", "format": "int64"},
            "limit": {"type": "integer", "format": "int64"},
        },
    }
    schemas["Info"] = {
        "type": "object",
        "required": ["version", "schema_version", "site_name", "uptime_seconds"],
        "properties": {
            "version": {"type": "string", "example": VERSION, "description": "brokerd version."},
            "schema_version": {"type": "integer", "example": 1, "description": "Schema version of the database."},
            "site_name": {"type": "string", "description": "The site setting site_name (empty when not set)."},
            "uptime_seconds": {"type": "integer", "format": "int64", "description": "Seconds since brokerd started."},
        },
    }
    schemas["Readiness"] = {
        "type": "object",
        "required": ["ready", "storage", "listeners"],
        "properties": {
            "ready": {"type": "boolean"},
            "storage": {"type": "string", "description": "`ok`, or why storage is not usable."},
            "listeners": {"type": "array", "items": {"type": "string"},
                          "description": "Listeners accepting connections; empty until all are up."},
            "directory": {"type": "string",
                          "description": "`ok`, or `unreachable: <why>` for an LDAP directory that cannot be "
                                         "reached (reported, but not a reason to be unready: docs/directory.md)."},
        },
    }
    schemas["DirectoryStatus"] = {
        "type": "object",
        "required": ["backend", "reachable"],
        "properties": {
            "backend": {"type": "string", "enum": ["builtin", "ldap"]},
            "reachable": {"type": "boolean", "description": "false after the last attempt to reach any LDAP server failed"},
            "server": {"type": "string", "description": "the LDAP server last reached"},
            "last_error": {"type": "string", "description": "the last connection failure"},
            "connection_failures": {"type": "integer"},
            "cached_identities": {"type": "integer"},
        },
    }
    schemas["DirectoryUser"] = {
        "type": "object",
        "required": ["result"],
        "properties": {
            "result": {"type": "string", "enum": ["ok", "account_disabled", "account_locked_out",
                                                  "must_change_credentials", "expired_credentials"]},
            "user_name": {"type": "string"}, "domain": {"type": "string"},
            "qualified_name": {"type": "string"}, "upn": {"type": "string"}, "sid": {"type": "string"},
            "display_name": {"type": "string"}, "email": {"type": "string"},
            "groups": {"type": "array", "items": {"type": "string"},
                       "description": "Every group, nested ones included, as DOMAIN\\Group, sorted."},
            "group_sids": {"type": "array", "items": {"type": "string"}},
        },
    }

    parameters = {
        "limit": {"name": "limit", "in": "query", "required": False,
                  "schema": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 100},
                  "description": "Page size (0 to 1000); out of range is a 400."},
        "offset": {"name": "offset", "in": "query", "required": False,
                   "schema": {"type": "integer", "minimum": 0, "default": 0},
                   "description": "Objects to skip."},
        "name": {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                 "description": "The object's name, URL-encoded."},
        "machineName": {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                        "example": "DEMO\\pool-01",
                        "description": "The machine's name, URL-encoded: `DEMO\\pool-01` is `DEMO%5Cpool-01`."},
    }

    paths = {}
    paths["/machines/{name}/secret"] = {"post": {
        "tags": ["machines"], "operationId": "rotateMachineSecret",
        "summary": "Give a machine a new agent secret (shown once)",
        "description": "Generates a random secret for the machine's agent (CBP authentication, docs/cbp.md) and "
                       "returns it this once; the broker keeps only its SHA-256, and the previous secret stops "
                       "working. Allowed on machines declared in the config file (the secret is state). "
                       "Other methods get 405 with `Allow: POST`. `brokerctl machine secret NAME`.",
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                        "example": "DEMO\\pool-01",
                        "description": "The machine's name, URL-encoded: `DEMO\\pool-01` is `DEMO%5Cpool-01`."}],
        "responses": responses(401, 404, 500, 503, ok={"200": {
            "description": "The new secret.",
            "content": json_content({"type": "object", "required": ["machine", "secret"], "properties": {
                "machine": {"type": "string"}, "secret": {"type": "string", "description": "64 hex characters"},
                "note": {"type": "string"}}}, {"machine": "DEMO\\pool-01", "secret": "9f2c" + "0" * 60,
                                               "note": "shown once; the agent authenticates with it"})}}),
    }}
    paths["/info"] = {"get": {
        "tags": ["site"], "operationId": "getInfo", "summary": "Version, schema version, site name and uptime",
        "responses": responses(401, 500, 503, ok={"200": {"description": "About this broker.",
                                                          "content": json_content(ref("schemas", "Info"), {
                                                              "version": VERSION, "schema_version": 1,
                                                              "site_name": "Example", "uptime_seconds": 3600})}}),
    }}
    paths["/site"] = {
        "get": {
            "tags": ["site"], "operationId": "getSite", "summary": "Get the site settings",
            "responses": responses(401, 500, 503, ok={"200": {"description": "The site settings.",
                                                              "content": json_content(ref("schemas", "Site"))}}),
        },
        "patch": {
            "tags": ["site"], "operationId": "updateSite", "summary": "Change site settings",
            "description": "Merges the given settings. 409 when the config file declares `[site]` (then the "
                           "settings are changed there). Other methods get 405 with `Allow: GET, PATCH`.",
            "requestBody": {"required": True, "content": json_content(ref("schemas", "SitePatch"))},
            "responses": responses(400, 401, 409, 413, 500, 503, ok={
                "200": {"description": "The updated site settings.", "content": json_content(ref("schemas", "Site"))}}),
        },
    }
    paths["/audit"] = {"get": {
        "tags": ["audit"], "operationId": "listAudit", "summary": "Read the audit log, newest first",
        "description": "Every create, update and delete, through the API or by config reconciliation, with the "
                       "object before and after (secrets omitted); and the broker's events: launches and why "
                       "they failed (`?action=launch-refused,launch-failed,launch-timeout`), session actions. "
                       "Other query parameters are a 400. `brokerctl audit list [--action A,...]`.",
        "parameters": [
            {"name": "kind", "in": "query", "required": False,
             "schema": {"type": "string", "enum": kind_names},
             "description": "Only entries for this kind (singular name, e.g. `delivery_group`)."},
            {"name": "object", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "Only entries for the object with this name."},
            {"name": "actor", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "Only entries by this actor, e.g. `token:ops` or `config:/etc/openbroker/brokerd.toml`."},
            {"name": "action", "in": "query", "required": False, "schema": {"type": "string"},
             "example": "launch-refused,launch-failed",
             "description": "Only entries with one of these actions (comma-separated), e.g. `launch-failed`. "
                            "An empty value is a 400."},
            ref("parameters", "limit"), ref("parameters", "offset"),
        ],
        "responses": responses(400, 401, 500, 503, ok={"200": {"description": "A page of audit entries.",
                                                               "content": json_content(ref("schemas", "AuditPage"))}}),
    }}
    paths["/directory"] = {"get": {
        "tags": ["directory"], "operationId": "getDirectory", "summary": "The user directory's backend and state",
        "description": "docs/directory.md. `brokerctl directory status`.",
        "responses": responses(401, 500, 503, ok={"200": {"description": "The directory.",
                                                          "content": json_content(ref("schemas", "DirectoryStatus"), {
                                                              "backend": "ldap", "reachable": True,
                                                              "server": "ldaps://dc1.example.com", "last_error": "",
                                                              "connection_failures": 0, "cached_identities": 12})}}),
    }}
    paths["/directory/users/{name}"] = {"get": {
        "tags": ["directory"], "operationId": "testDirectoryUser", "summary": "Look a user up in the directory",
        "description": "A trusted look-up (no password), as for a pass-through front end: the user's identity and "
                       "every group, nested ones included. 404 when there is no such user, 503 when the directory "
                       "cannot be reached. `brokerctl directory test USER`.",
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                        "example": "CORP\\alice",
                        "description": "`DOMAIN\\user`, `user`, a UPN or a SID, URL-encoded."},
                       {"name": "domain", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "The NT domain for a bare user name."}],
        "responses": responses(401, 404, 500, 503, ok={"200": {"description": "The user.",
                                                               "content": json_content(ref("schemas", "DirectoryUser"))}}),
    }}
    for k in kinds:
        if k["name"] == "power_action":
            paths.update(power_action_paths())
        elif k["name"] != "site":
            paths.update(kind_paths(kinds, k))
        if k["name"] == "session":
            paths.update(session_action_paths())

    root_server = [{
        "url": "{scheme}://{host}:{port}",
        "description": "The admin listener, outside /api/v1.",
        "variables": {"scheme": {"default": "http", "enum": ["http", "https"]},
                      "host": {"default": "127.0.0.1"}, "port": {"default": "8082"}},
    }]
    optional_auth = [{"bearerAuth": []}, {}]
    paths["/healthz"] = {
        "servers": root_server,
        "get": {
            "tags": ["health"], "operationId": "healthz", "summary": "Liveness",
            "description": "Never needs a token. 200 `ok` while the process serves; HEAD works too.",
            "security": [],
            "responses": {"200": {"description": "Alive.",
                                  "content": {"text/plain": {"schema": {"type": "string"}, "example": "ok\n"}}}},
        },
    }
    paths["/readyz"] = {
        "servers": root_server,
        "get": {
            "tags": ["health"], "operationId": "readyz", "summary": "Readiness",
            "description": "Ready when storage answers and all listeners are up. Needs a token unless listed in "
                           "`[admin] unauthenticated_paths`.",
            "security": optional_auth,
            "responses": {
                "200": {"description": "Ready.", "content": json_content(ref("schemas", "Readiness"), {
                    "ready": True, "storage": "ok", "listeners": ["xml", "agent", "admin"]})},
                "401": ref("responses", "Unauthorized"),
                "503": {"description": "Not ready; `storage` or `listeners` says why.",
                        "content": json_content(ref("schemas", "Readiness"), {
                            "ready": False, "storage": "database is closed", "listeners": []})},
            },
        },
    }
    metrics_text = "\n".join([
        "Prometheus text format 0.0.4. Families:",
        "",
        "* `broker_http_requests_total{listener,route,method,status}` counter",
        "* `broker_http_request_duration_seconds{listener,route}` histogram",
        "* `broker_http_connections{listener}` gauge: open connections",
        "* `broker_machines{registration_state}` gauge: from the engine's live state",
        "* `broker_sessions{state}` gauge",
        "* `broker_power_actions{hypervisor_connection,state}` gauge: power actions by state (Pending, Started, "
        "and those finished within the retention), every state listed",
        "* `broker_power_queue_depth{hypervisor_connection}` gauge: Pending power actions",
        "* `broker_storage_commit_seconds` histogram: one group commit (a batch of write transactions)",
        "* `broker_storage_commit_batches_total` counter: group commits",
        "* `broker_storage_commit_batch_writes_total` counter: write transactions committed in them (their ratio is the mean batch size)",
        "* `broker_storage_rows_read_total` counter: rows storage statements returned (reads in read and write transactions)",
        "* `broker_sta_requests_total{request,result}` counter, `broker_sta_request_duration_seconds` histogram, `broker_sta_tickets_outstanding` gauge: the Secure Ticket Authority",
        "* `broker_cbp_events_total{event,result}` counter: agent protocol events",
        "* `broker_accept_failures_total{listener,reason}` counter: accept() failures (e.g. out of file descriptors; the listener backs off)",
        "* `broker_connections_refused_total{listener,reason}` counter: connections closed at accept by a connection cap",
        "* `broker_connections_over_limit_total{listener}` counter: agent connections taken over the cap to be told BrokerRegistrationLimitReached",
        "* `broker_password_checks_total{result}` counter, `broker_password_checks_running` and `broker_password_checks_queued` gauges, `broker_password_check_wait_seconds` histogram: the bounded password-hash pool",
        "* `broker_xml_logons_throttled_total` counter: password logons refused by the per-address failed-logon throttle",
        "* `broker_directory_up` gauge, `broker_directory_connection_failures_total` and `broker_directory_cached_logons_total` counters: the LDAP directory (docs/directory.md)",
        "* `broker_up` gauge: 1 while the broker serves",
        "",
        "Needs a token unless listed in `[admin] unauthenticated_paths`.",
    ])
    paths["/metrics"] = {
        "servers": root_server,
        "get": {
            "tags": ["health"], "operationId": "metrics", "summary": "Prometheus metrics",
            "description": metrics_text + "\n",
            "security": optional_auth,
            "responses": {
                "200": {"description": "The metrics.",
                        "content": {"text/plain; version=0.0.4": {"schema": {"type": "string"},
                                                                  "example": "broker_up 1\n"}}},
                "401": ref("responses", "Unauthorized"),
            },
        },
    }

    tags = [{"name": "site", "description": "Site settings and broker information."},
            {"name": "audit", "description": "Who changed what."},
            {"name": "directory", "description": "The user directory (docs/directory.md)."}]
    for k in kinds:
        if k["name"] != "site":
            tags.append({"name": k["plural"], "description": KIND_DESCRIPTIONS.get(k["name"], label(k["name"]))})
    tags.append({"name": "health", "description": "Probes and metrics, outside /api/v1."})

    return {
        "openapi": "3.0.3",
        "info": {
            "title": "openbroker admin API",
            "version": VERSION,
            "description": api_description(kinds),
        },
        "servers": [{
            "url": "{scheme}://{host}:{port}/api/v1",
            "description": "The admin listener ([listeners.admin] in the config file).",
            "variables": {"scheme": {"default": "http", "enum": ["http", "https"]},
                          "host": {"default": "127.0.0.1"}, "port": {"default": "8082"}},
        }],
        "security": [{"bearerAuth": []}],
        "tags": tags,
        "paths": paths,
        "components": {
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "An admin token whose SHA-256 is listed in `[[admin.token]]` of the config file.",
            }},
            "parameters": parameters,
            "responses": dict(components_responses()),
            "schemas": schemas,
        },
    }


# ------------------------------------------------------------------------------------------------
# A small YAML writer (block style, strings double-quoted unless plainly safe), so the script
# needs nothing beyond the standard library and the output is stable.

PLAIN = re.compile(r"^[A-Za-z_/$][A-Za-z0-9_./$-]*$")
RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


def scalar(v):
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, int):
        return str(v)
    s = str(v)
    if PLAIN.match(s) and s.lower() not in RESERVED:
        return s
    return json.dumps(s, ensure_ascii=False)


def key(k):
    k = str(k)
    return k if PLAIN.match(k) and k.lower() not in RESERVED else json.dumps(k, ensure_ascii=False)


def emit(value, indent, out):
    pad = " " * indent
    if isinstance(value, dict):
        for k, v in value.items():
            emit_member(pad + key(k) + ":", v, indent, out)
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, dict) and v:
                sub = []
                emit(v, indent + 2, sub)
                out.append(pad + "- " + sub[0][indent + 2:])
                out.extend(sub[1:])
            elif isinstance(v, list) and v:
                out.append(pad + "-")
                emit(v, indent + 2, out)
            else:
                emit_member(pad + "-", v, indent, out)
    else:
        raise TypeError(value)


def emit_member(head, v, indent, out):
    if isinstance(v, dict):
        if v:
            out.append(head)
            emit(v, indent + 2, out)
        else:
            out.append(head + " {}")
    elif isinstance(v, list):
        if v:
            out.append(head)
            emit(v, indent + 2, out)
        else:
            out.append(head + " []")
    elif isinstance(v, str) and "\n" in v:
        out.append(head + (" |" if v.endswith("\n") else " |-"))
        for line in v.rstrip("\n").split("\n"):
            out.append((" " * (indent + 2) + line) if line else "")
    else:
        out.append(head + " " + scalar(v))


def to_yaml(doc):
    out = [
        "# docs/openapi.yaml: the admin REST API of brokerd (OpenAPI 3.0.3).",
        "# Generated by scripts/gen-openapi.py from common/model.cpp; do not edit by hand.",
        "# Regenerate after changing the site model or the admin routes: scripts/gen-openapi.py",
    ]
    emit(doc, 0, out)
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the file is out of date, change nothing")
    ap.add_argument("--output", default=OUTPUT, help="where to write (default: docs/openapi.yaml)")
    args = ap.parse_args()

    text = to_yaml(build(read_kinds(find_compiler())))
    if args.check:
        try:
            with open(args.output, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = ""
        if current != text:
            print("gen-openapi: %s is out of date; run scripts/gen-openapi.py" % os.path.relpath(args.output, ROOT),
                  file=sys.stderr)
            return 1
        return 0
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    print("gen-openapi: wrote %s" % os.path.relpath(args.output, ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
