"""tus 1.0.0 (https://tus.io/protocols/resumable-upload) at ``/api/v1/tus/``, so stock
resumable-upload clients (tus-js-client, Uppy, tuspy, ...) upload to vod unchanged.

``protocol`` parses tus's headers, ``state`` keeps a tus upload in Redis beside the native
upload state it extends, ``service`` applies the rules over ``UploadService``, and
``handlers`` speaks HTTP. docs/ARCHITECTURE.md ("tus") records the storage decisions.
"""
