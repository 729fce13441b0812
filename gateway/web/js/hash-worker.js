// Computes a file's content hash off the page's thread, so a large file keeps the page
// responsive. In: {file}. Out: {type:"progress", hashed} per 4 MiB block, then
// {type:"done", contentHash} or {type:"error", message}.
import { contentHash } from "./sha256.js";

self.onmessage = async (event) => {
  const { file } = event.data;
  try {
    const hash = await contentHash(file, (hashed) => self.postMessage({ type: "progress", hashed }));
    self.postMessage({ type: "done", contentHash: hash });
  } catch (error) {
    self.postMessage({ type: "error", message: String(error && error.message ? error.message : error) });
  }
};
