// useTaskStream: a React hook in the shape of a Django Channels `useTaskWebSocket` hook,
// built on streamer.js (load /static/streamer.js from the streamer server first).
//
//   const { isConnected, activeTasks, getTaskStatus, cancelTask, refreshActiveTasks } =
//     useTaskStream({ url: "https://stream.example.com", token, onProgress, onCompleted, onError });
//
// activeTasks maps task ids to their full state. Every event carries the whole state of its
// task, so an entry is replaced, never merged. The stream resumes by itself after a drop,
// falls back from WebSocket to SSE, and its commands work on both transports.
import { useCallback, useEffect, useRef, useState } from "react";

const byTaskId = (tasks) => Object.fromEntries(tasks.map((task) => [task.task_id, task]));

export function useTaskStream({ url, token, transport = "auto", onProgress, onCompleted, onError }) {
  const [isConnected, setIsConnected] = useState(false);
  const [activeTasks, setActiveTasks] = useState({});
  const streamRef = useRef(null);
  // The latest callbacks, without reconnecting when the component passes new functions.
  const callbacks = useRef({});
  callbacks.current = { onProgress, onCompleted, onError };

  useEffect(() => {
    const stream = new window.Streamer.TaskStream({
      url,
      token,
      transport,
      onEvent(message) {
        if (message.type === "active_tasks") {
          setActiveTasks(byTaskId(message.tasks));
        } else if (message.type === "task_progress" || message.type === "task_completed") {
          setActiveTasks((tasks) => ({ ...tasks, [message.task_id]: message }));
          const { onProgress, onCompleted, onError } = callbacks.current;
          if (message.type === "task_progress") onProgress?.(message);
          else if (message.status === "SUCCESS") onCompleted?.(message);
          else onError?.(message);
        }
      },
      onStatus(text, state) {
        setIsConnected(state === "connected");
        // A refused token ends the stream (no reconnect loop): tell the page.
        if (state === "unauthorized") callbacks.current.onError?.({ error_message: text });
      },
    });
    streamRef.current = stream;
    stream.start();
    return () => stream.stop();
  }, [url, token, transport]);

  const getTaskStatus = useCallback(
    async (taskId) => (await streamRef.current.getTaskStatus(taskId)).status,
    [],
  );
  const cancelTask = useCallback(
    async (taskId) => (await streamRef.current.cancelTask(taskId)).success,
    [],
  );
  const refreshActiveTasks = useCallback(async () => {
    setActiveTasks(byTaskId((await streamRef.current.getActiveTasks()).tasks));
  }, []);

  return { isConnected, activeTasks, getTaskStatus, cancelTask, refreshActiveTasks };
}
