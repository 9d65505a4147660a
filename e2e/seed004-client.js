// The document's client class (seed 004, "Client Implementation Example",
// app/services/roadmap/websocket.service.ts), transpiled from TypeScript by
// hand ONLY where the syntax requires: `export`, `private`, type annotations
// and the constructor's parameter property are gone; every statement, and
// every quirk (PONG on its own 30 s timer, reconnect on any close but 1000,
// the URL built from window.location.host), is kept as written.
// Loaded as a classic <script>, so the class is a page global.

class RoadmapWebSocket {
  ws = null;
  reconnectAttempts = 0;
  maxReconnectAttempts = 5;
  pingInterval = null;

  constructor(handlers) {
    this.handlers = handlers;
  }

  connect() {
    const protocol = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
    const wsUrl = `${protocol}//${window.location.host}/api/roadmap/ws`;

    this.ws = new WebSocket(wsUrl);

    this.ws.onopen = () => {
      console.log('[RoadmapWS] Connected');
      this.reconnectAttempts = 0;
      this.startPingPong();
    };

    this.ws.onmessage = (event) => {
      const message = JSON.parse(event.data);

      switch (message.type) {
        case 'VOTE_UPDATE':
          this.handlers.onVoteUpdate(message);
          break;
        case 'FEATURE_UPDATE':
          this.handlers.onFeatureUpdate(message);
          break;
        case 'FEATURE_CREATED':
          this.handlers.onFeatureCreated(message);
          break;
        case 'FEATURE_DELETED':
          this.handlers.onFeatureDeleted(message);
          break;
        case 'ERROR':
          this.handlers.onError(message);
          break;
        case 'PING':
          this.ws?.send(JSON.stringify({ type: 'PONG' }));
          break;
      }
    };

    this.ws.onerror = (error) => {
      console.error('[RoadmapWS] Error:', error);
      this.reconnect();
    };

    this.ws.onclose = (event) => {
      console.log('[RoadmapWS] Closed:', event.code, event.reason);
      this.stopPingPong();

      if (event.code !== 1000) { // Not normal closure
        this.reconnect();
      }
    };
  }

  reconnect() {
    if (this.reconnectAttempts >= this.maxReconnectAttempts) {
      console.error('[RoadmapWS] Max reconnect attempts reached');
      return;
    }

    const delay = Math.min(1000 * Math.pow(2, this.reconnectAttempts), 30000);
    console.log(`[RoadmapWS] Reconnecting in ${delay}ms...`);

    setTimeout(() => {
      this.reconnectAttempts++;
      this.connect();
    }, delay);
  }

  startPingPong() {
    this.pingInterval = setInterval(() => {
      if (this.ws?.readyState === WebSocket.OPEN) {
        this.ws.send(JSON.stringify({ type: 'PONG' }));
      }
    }, 30000);
  }

  stopPingPong() {
    if (this.pingInterval) {
      clearInterval(this.pingInterval);
      this.pingInterval = null;
    }
  }

  disconnect() {
    this.stopPingPong();
    this.ws?.close(1000, 'Client disconnect');
    this.ws = null;
  }

  subscribe(featureIds) {
    if (this.ws?.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({
        type: 'SUBSCRIBE',
        featureIds
      }));
    }
  }

  unsubscribe(featureIds) {
    if (this.ws?.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({
        type: 'UNSUBSCRIBE',
        featureIds
      }));
    }
  }
}
