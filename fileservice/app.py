"""The FileService's HTTP API: its public key for anyone, an upload for senders, listing and download
for the TTP's operator. The OpenAPI document is served at /openapi.json.

A site sends a task's file as PUT /files/TASK/NAME; it is listed as TASK/NAME and downloaded from
/files/SENDER/TASK/NAME (fileservice/inbox.py says why)."""

import logging

from apiflask import APIFlask, HTTPTokenAuth, Schema
from apiflask.fields import Boolean, Integer, String
from flask import current_app, request, send_file

from fileservice.inbox import OPERATOR, SENDER, Inbox, Refused
from master.api_docs import register_api_docs
from master.schemas import Sha256

log = logging.getLogger("pht.fileservice")

token_auth = HTTPTokenAuth(scheme="Bearer", description="A sender's or operator's token, from the TTP.")


class PublicKeyOut(Schema):
    public_key = String(metadata={"description": "age X25519 recipient (age1...): encrypt files to this."})


class UploadHeaders(Schema):
    sha256 = Sha256(required=True, data_key="X-Content-SHA256")


RECEIVED_NAME = "As list-files shows it, and export, delete and the download take it: TASK/NAME, or NAME alone."


class StoredOut(Schema):
    sender = String()
    name = String(metadata={"description": RECEIVED_NAME})
    size = Integer()
    already_received = Boolean(metadata={"description": "The same file had arrived before."})


class FileOut(Schema):
    sender = String()
    name = String(metadata={"description": RECEIVED_NAME})
    size = Integer()


def create_app(data_dir, max_file_bytes):
    app = APIFlask("pht-fileservice", title="PHT FileService", version="1.0",
                   spec_path="/openapi.json", docs_path=None)
    app.config["SECURITY_SCHEMES"] = {"BearerAuth": {"type": "http", "scheme": "bearer"}}
    register_api_docs(app)  # /docs, from local files
    app.extensions["inbox"] = Inbox(data_dir)
    app.extensions["max_file_bytes"] = max_file_bytes

    @token_auth.verify_token
    def _caller(token):
        return current_app.extensions["inbox"].caller_of(token) if token else None

    @token_auth.get_user_roles
    def _role(caller):
        return [caller[1]]

    app.register_error_handler(Refused, lambda error: ({"message": str(error), "detail": {}}, error.status))

    @app.get("/health")
    def health():
        """Liveness check; needs no token."""
        return {"status": "ok"}

    @app.get("/public-key")
    @app.output(PublicKeyOut)
    def public_key():
        """The service's public key. Senders should pin it in their configuration, not fetch it."""
        return {"public_key": app.extensions["inbox"].public_key}

    def store_upload(task, name, declared_sha256):
        sender = token_auth.current_user[0]
        limit = app.extensions["max_file_bytes"]
        request.max_content_length = limit
        received, size, already = app.extensions["inbox"].receive(sender, task, name, request.stream,
                                                                  declared_sha256, limit)
        log.info("file %s/%s received: %d bytes%s", sender, received, size, " (again)" if already else "")
        return {"sender": sender, "name": str(received), "size": size, "already_received": already}

    @app.put("/files/<task>/<name>")
    @app.auth_required(token_auth, roles=[SENDER])
    @app.input(UploadHeaders, location="headers")
    @app.output(StoredOut)
    @app.doc(responses=[400, 409, 413])
    def receive_file(task, name, headers_data):
        """Receive a task's file, kept as TASK/NAME.

        The body is the file, encrypted to this service's key, checked against its sha256. TASK is the registry's
        task id: another task's file of that name is another file, not a conflict."""
        return store_upload(task, name, headers_data["sha256"])

    @app.put("/files/<name>")
    @app.auth_required(token_auth, roles=[SENDER])
    @app.input(UploadHeaders, location="headers")
    @app.output(StoredOut)
    @app.doc(responses=[400, 409, 413], deprecated=True)
    def receive_file_without_task(name, headers_data):
        """Receive a file from a site runner that names no task.

        Kept as NAME, so another task's file of that name is a conflict (409): newer runners send
        PUT /files/{task}/{name}."""
        return store_upload(None, name, headers_data["sha256"])

    @app.get("/files")
    @app.auth_required(token_auth, roles=[OPERATOR])
    @app.output(FileOut(many=True))
    def list_files():
        """Every received file, by sender."""
        return app.extensions["inbox"].listing()

    @app.get("/files/<sender>/<path:name>")
    @app.auth_required(token_auth, roles=[OPERATOR])
    @app.doc(responses={200: {"description": "The file as received (age-encrypted).",
                              "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                  "format": "binary"}}}},
                        404: "No such file."})
    def download_file(sender, name):
        """A received file, still encrypted.

        NAME as GET /files lists it (TASK/NAME); decrypt the file with the service's identity (`export`)."""
        return send_file(app.extensions["inbox"].path_of(sender, name), mimetype="application/octet-stream")

    @app.after_request
    def _log_request(response):
        if response.status_code >= 400:
            log.info("%s %s -> %s", request.method, request.path, response.status_code)
        return response

    return app
