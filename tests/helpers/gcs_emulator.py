"""gcp-storage-emulator as `python tests/helpers/gcs_emulator.py PORT`: in memory, bucket `bucket`, 127.0.0.1.

One fix over the package as released: real GCS answers a media download with the object's
`x-goog-generation` (and `x-goog-metageneration`) header, the emulator leaves them out.
tensorstore's gcs driver reads the generation from that header to make its read-modify-write of
an OCDBT manifest conditional (`ifGenerationMatch`); without it a save that commits a manifest
twice fails with "Malformed StorageGeneration". The handler below adds the headers from the
emulator's own object record, as GCS documents them; nothing else changes. (The emulator also
does not enforce `ifGenerationMatch`: harmless here, where each object has one writer.)
"""

import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # not found: the handler already answered 404
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])


if __name__ == "__main__":
    objects.download = download_with_generation  # `objects.get` with alt=media calls it by this name
    for _, methods in server.HANDLERS:
        for method, handler in methods.items():
            if handler is _download:
                methods[method] = download_with_generation
    server.create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket="bucket").run()
