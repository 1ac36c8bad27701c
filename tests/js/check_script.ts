// Compiled (not run) by tests/test_js_module.py with `tsc -p tests/js`: a page's script that
// loads streamer.js with a <script> tag uses the global it defines; the module file it is
// not may lend it types, never values.
import type { ServerMessage, TaskState } from "../../streamer/static/streamer.js";
import * as script from "../../streamer/static/streamer.js";

const seen: TaskState[] = [];
const stream = new Streamer.TaskStream({
  url: "https://stream.example.com",
  token: "a-token",
  onEvent(message: ServerMessage) {
    if (message.type === "active_tasks") seen.push(...message.tasks);
  },
});
stream.start();
const board: InstanceType<typeof window.Streamer.TaskBoard> = new window.Streamer.TaskBoard(
  document.body,
);
board.render();
const refused = new Streamer.CommandError("invalid_task_id", "no such task");
const code: string = refused.code;

// @ts-expect-error streamer.js is a classic script: importing it gives no TaskStream.
new script.TaskStream({ url: "https://stream.example.com" });

export { code };
