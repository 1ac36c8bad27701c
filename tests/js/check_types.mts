// Compiled (not run) by tests/test_js_module.py with `tsc -p tests/js`: code written against
// streamer.d.ts as an application would write it, plus uses the types must refuse.
import Streamer, {
  CommandError,
  TaskBoard,
  TaskStream,
  type ServerMessage,
  type TaskState,
} from "../../streamer/static/streamer.mjs";

const tasks = new Map<string, TaskState>();

const stream = new TaskStream({
  url: "https://stream.example.com",
  token: "a-token",
  transport: "auto",
  getToken: async () => (await fetch("/my-app/streamer-token")).text(),
  shareConnection: true,
  onEvent(message: ServerMessage) {
    switch (message.type) {
      case "active_tasks":
        for (const task of message.tasks) tasks.set(task.task_id, task);
        break;
      case "task_progress":
      case "task_completed": {
        const progress: number | null = message.progress;
        tasks.set(message.task_id, { ...message, progress });
        break;
      }
      case "error":
        console.warn(message.code, message.message);
        break;
    }
  },
  onStatus(text, state) {
    if (state === "unauthorized") console.warn(text);
  },
});
stream.start();
const leads: boolean = stream.leader;
void leads;

async function cancelIfRunning(taskId: string): Promise<boolean> {
  const reply = await stream.getTaskStatus(taskId);
  if (reply.status === null || reply.status.status !== "PROGRESS") return false;
  try {
    return (await stream.cancelTask(taskId)).success;
  } catch (error) {
    if (error instanceof CommandError && error.code === "rate_limited") return false;
    throw error;
  }
}
void cancelIfRunning("report-7");

const board = new TaskBoard(document.createElement("div"), { onCancel: cancelIfRunning });
board.handle({ type: "pong" });
const sameClass: typeof TaskStream = Streamer.TaskStream;
void sameClass;
const fromWindow: typeof TaskBoard = window.Streamer.TaskBoard;
void fromWindow;

// @ts-expect-error: not a transport
new TaskStream({ transport: "carrier-pigeon" });
// @ts-expect-error: replies are promises, not messages
const notAPromise: TaskStatusMessage = stream.getTaskStatus("x");
void notAPromise;
type TaskStatusMessage = Awaited<ReturnType<TaskStream["getTaskStatus"]>>;
