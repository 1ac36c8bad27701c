// Types of streamer.mjs, the ES module (the messages are those of the service's SPEC).
// streamer.d.ts declares the same for streamer.js, the classic script (window.Streamer).

export type TaskStatus =
  | "PENDING" | "STARTED" | "PROGRESS" | "RETRY" | "SUCCESS" | "FAILURE" | "REVOKED";

/** A task's full state; every task event carries all of it. */
export interface TaskState {
  task_id: string;
  task_name: string | null;
  category: string | null;
  status: TaskStatus;
  progress: number | null;
  current_step: string | null;
  processed_items: number | null;
  total_items: number | null;
  created_at: string | null;
  started_at: string | null;
  completed_at: string | null;
  estimated_completion: string | null;
  result_data: Record<string, unknown> | null;
  error_message: string | null;
}

export interface ActiveTasksMessage {
  type: "active_tasks";
  /** The resume point this snapshot stands at. */
  id: string;
  tasks: TaskState[];
  /** false: events were lost (history gone); the snapshot is the current state. */
  recovered: boolean;
  /** true when the user has more unfinished tasks than a snapshot carries. */
  truncated: boolean;
}

export interface TaskProgressMessage extends TaskState {
  type: "task_progress";
  id: string;
}

export interface TaskCompletedMessage extends TaskState {
  type: "task_completed";
  id: string;
}

export interface TaskStatusMessage {
  type: "task_status";
  task_id: string;
  /** null when the task is unknown or not the user's (the two look the same). */
  status: TaskState | null;
}

export interface TaskCancelledMessage {
  type: "task_cancelled";
  task_id: string;
  success: boolean;
}

export interface ErrorMessage {
  type: "error";
  code: string;
  message: string;
}

export type ServerMessage =
  | ActiveTasksMessage
  | TaskProgressMessage
  | TaskCompletedMessage
  | TaskStatusMessage
  | TaskCancelledMessage
  | ErrorMessage
  | { type: "pong" };

export type StreamState = "connecting" | "connected" | "reconnecting" | "unauthorized" | "stopped";

export type Transport = "auto" | "websocket" | "sse" | "poll";

export interface TaskStreamOptions {
  /** The service's origin; default: the page's. */
  url?: string;
  /** An access token; without it the session cookie is used. */
  token?: string | null;
  /** Only this task. */
  taskId?: string | null;
  /** "auto" (default) starts on WebSocket and falls back to SSE; "poll": long polling. */
  transport?: Transport;
  onEvent?: (message: ServerMessage) => void;
  onStatus?: (text: string, state: StreamState) => void;
  /**
   * A fresh token (or a Promise of one; null when there is none), asked for shortly before
   * the token's `exp` and once when the server refuses it.
   */
  getToken?: (() => string | null | undefined | Promise<string | null | undefined>) | null;
  /** The tabs of one user share one connection (default true). */
  shareConnection?: boolean;
  /**
   * Long polling: how long a poll may go unanswered before a new one is made (default
   * 60000 ms; keep the server's STREAMER_POLL_TIMEOUT_S below it).
   */
  pollTimeoutMs?: number;
}

export class TaskStream {
  constructor(options?: TaskStreamOptions);
  readonly url: string;
  token: string | null;
  readonly taskId: string | null;
  /** The transport in use. */
  transport: Exclude<Transport, "auto">;
  /** The id of the last event or snapshot received: the resume point. */
  lastEventId: string | null;
  /** Whether this tab holds the connection (tabs that share one follow the leader). */
  readonly leader: boolean;
  /** How long a long poll may go unanswered before a new one is made. */
  readonly pollTimeoutMs: number;
  start(): void;
  stop(): void;
  /** Send a raw command on the open WebSocket; false when there is none. */
  send(command: Record<string, unknown>): boolean;
  getTaskStatus(taskId: string): Promise<TaskStatusMessage>;
  cancelTask(taskId: string): Promise<TaskCancelledMessage>;
  getActiveTasks(): Promise<ActiveTasksMessage>;
}

export interface TaskBoardOptions {
  /** Called with a task id when its Cancel button is pressed. */
  onCancel?: ((taskId: string) => void) | null;
  cancellable?: boolean;
}

/** Renders tasks into a container element from the stream's messages. */
export class TaskBoard {
  constructor(container: HTMLElement, options?: TaskBoardOptions);
  readonly tasks: Map<string, TaskState>;
  cancellable: boolean;
  /** Apply one server message; true when it changed the board. */
  handle(message: ServerMessage): boolean;
  render(): void;
}

/** A command the server refused (or that got no answer). */
export class CommandError extends Error {
  constructor(code: string, message?: string, status?: number);
  readonly code: string;
  /** The HTTP status when the command went over HTTP, else null. */
  readonly status: number | null;
}

declare const Streamer: {
  TaskStream: typeof TaskStream;
  TaskBoard: typeof TaskBoard;
  CommandError: typeof CommandError;
};
export default Streamer;
